"""`megapile data sample OUT_DIR`: a small Pile-format corpus built from text already on this machine.

No download: the documents are real text found locally, each under an honest component name
in `meta.pile_set_name`:

    Github      source files of the Python standard library
    Docstrings  docstrings of those modules, one document per module (always available)
    ManPages    English man pages (/usr/share/man/man*), macros stripped to plain text
    Docs        READMEs, changelogs and text files under /usr/share/doc

Layout: OUT_DIR/train/00.jsonl.zst, 01.jsonl.zst ..., OUT_DIR/val/00.jsonl.zst and
OUT_DIR/test/00.jsonl.zst (like the Pile's shards, but one directory per split, so that
'OUT_DIR/SPLIT/*.jsonl.zst' names a split), plus OUT_DIR/manifest.json with the counts.

Files are picked and documents shuffled across components by a seeded hash of each file's path
(relative to its root), then split by document (4% val, 4% test). On one machine the output is
byte-for-byte deterministic (fixed seed, fixed zstd level); on another it differs only as far as
the installed files differ, and a file added or removed does not reorder the others.
`--max-mb` caps the raw text.
"""
from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import inspect
import json
import os
import re
import sys
import sysconfig
from typing import Callable, Iterator, Optional

import zstandard

from megapile.data import DataError

SHARES = {"Docs": 0.2, "ManPages": 0.2, "Docstrings": 0.1, "Github": 0.5}  # of --max-mb; Github takes what is left
MAX_FILE_BYTES = 1 << 20  # longer files are left out, to keep documents a sensible size
MIN_DOC_CHARS = 200
HELD_OUT = 25  # 1 in 25 documents goes to val, 1 in 25 to test
DOC_ROOT = "/usr/share/doc"
MAN_ROOT = "/usr/share/man"


def _walk(root: str, keep: Callable[[str, str], bool], skip_dirs: tuple[str, ...] = ()) -> list[str]:
    """Sorted paths under root whose (dirpath, name) pass `keep`; missing root gives []."""
    out = []
    for dirpath, dirnames, names in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs)
        out += [os.path.join(dirpath, n) for n in sorted(names) if keep(dirpath, n)]
    return out


def _read_text(path: str) -> Optional[str]:
    try:
        if os.path.getsize(path) > MAX_FILE_BYTES:
            return None
        with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
            data = f.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES or b"\x00" in data:
            return None
        return data.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError):
        return None


def stdlib_files() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    skip = ("site-packages", "dist-packages", "__pycache__", "idlelib", "turtledemo")
    return _walk(root, lambda d, n: n.endswith(".py"), skip)


def _is_test(path: str) -> bool:
    parts = path.split(os.sep)
    return "test" in parts or "tests" in parts or os.path.basename(path).startswith("test_")


def github_docs(files: list[str]) -> Iterator[tuple[str, str]]:
    for path in files:
        text = _read_text(path)
        if text and len(text) >= MIN_DOC_CHARS:
            yield path, text


def docstring_docs(files: list[str]) -> Iterator[tuple[str, str]]:
    root = sysconfig.get_paths()["stdlib"]
    for path in files:
        source = _read_text(path)
        if not source:
            continue
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            continue
        module = os.path.relpath(path, root)[:-3].replace(os.sep, ".").removesuffix(".__init__")
        parts = [f"Module {module}"]
        if doc := ast.get_docstring(tree):
            parts.append(doc)
        for node, owner in _documented(tree):
            if isinstance(node, ast.ClassDef):
                parts.append(f"class {owner}{node.name}\n\n{ast.get_docstring(node)}")
            else:
                parts.append(f"{owner}{node.name}({ast.unparse(node.args)})\n\n{ast.get_docstring(node)}")
        text = "\n\n".join(inspect.cleandoc(p) for p in parts)
        if len(text) >= MIN_DOC_CHARS:
            yield path, text


def _documented(tree: ast.Module, owner: str = ""):
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            if ast.get_docstring(node):
                yield node, owner
            if isinstance(node, ast.ClassDef):
                yield from _documented(node, f"{owner}{node.name}.")


def man_files() -> list[str]:
    return _walk(MAN_ROOT, lambda d, n: re.fullmatch(r"man\d\w*", os.path.basename(d)) is not None)


_MAN_TEXT_MACROS = {"B", "I", "BR", "BI", "IB", "IR", "RB", "RI", "SM", "SB", "TH", "SH", "SS", "IP", "TP", "Nm", "Nd"}
_MAN_ESCAPES = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),  # font changes
    (re.compile(r"\\\((em|en)"), "-"),
    (re.compile(r"\\\((lq|rq|dq)"), '"'),
    (re.compile(r"\\\((aq|oq|cq)"), "'"),
    (re.compile(r"\\\(.."), ""),
    (re.compile(r"\\\[[^\]]*\]"), ""),
    (re.compile(r"\\[-]"), "-"),
    (re.compile(r"\\[e\\]"), "\\\\"),
    (re.compile(r"\\[&|^%:c0 ~]"), lambda m: " " if m.group(0) in ("\\ ", "\\~", "\\0") else ""),
    (re.compile(r"\\\*(\(..|\[[^\]]*\]|.)"), ""),
    (re.compile(r"\\s[-+]?\d"), ""),
    (re.compile(r"\n{3,}"), "\n\n"),
]


def man_to_text(source: str) -> str:
    """Plain text of a roff man page: comments and layout macros dropped, escapes resolved."""
    out = []
    for line in source.splitlines():
        if line.startswith((".\\\"", "'\\\"", '.\\"', "\\\"")):
            continue
        if line.startswith((".", "'")):
            m = re.match(r"[.']\s*(\w+)\s*(.*)", line)
            if not m:
                continue
            macro, rest = m.groups()
            if macro in ("SH", "SS", "PP", "P", "LP", "TP", "sp", "Sh"):
                out.append("")
            if macro in _MAN_TEXT_MACROS or macro in ("Sh", "Ss", "Pp"):
                out.append(rest.replace('"', ""))
            continue
        out.append(line)
    text = "\n".join(out)
    for pattern, repl in _MAN_ESCAPES:
        text = pattern.sub(repl, text)
    return text.strip() + "\n"


def man_docs(files: list[str]) -> Iterator[tuple[str, str]]:
    for path in files:
        source = _read_text(path)
        if source and not source.lstrip().startswith(".so "):
            text = man_to_text(source)
            if len(text) >= MIN_DOC_CHARS:
                yield path, text


def doc_files() -> list[str]:
    def keep(d: str, name: str) -> bool:
        low = name.lower()
        if low.startswith("copyright") or low.endswith((".html", ".htm", ".png", ".gif", ".jpg", ".svg", ".pdf")):
            return False
        base = low.removesuffix(".gz")
        return base.endswith((".txt", ".md", ".rst")) or base.startswith(("readme", "news", "changelog", "changes"))

    return _walk(DOC_ROOT, keep)


def text_docs(files: list[str]) -> Iterator[tuple[str, str]]:
    for path in files:
        text = _read_text(path)
        if text and len(text) >= MIN_DOC_CHARS:
            yield path, text


def _take(docs: Iterator[tuple[str, str]], budget: int, component: str) -> list[dict]:
    """Documents that fit in `budget` bytes, in the given order; gives up after 100 that do not fit."""
    out, size, misses = [], 0, 0
    for path, text in docs:
        n = len(text.encode("utf-8"))
        if size + n > budget:
            misses += 1
            if misses > 100 or budget - size < MIN_DOC_CHARS:
                break
            continue
        out.append({"text": text, "meta": {"pile_set_name": component, "source": path}})
        size += n
    return out


_ROOTS = (os.path.join(sysconfig.get_paths()["stdlib"], ""), os.path.join(DOC_ROOT, ""), os.path.join(MAN_ROOT, ""))


def _rank(seed: int, component: str, path: str) -> bytes:
    """Shuffle key of a file: a hash of its path below its root, so that a file added or removed on
    a machine leaves the order of all the others unchanged (and the same Python gives the same order)."""
    for root in _ROOTS:
        if path.startswith(root):
            path = path[len(root) :]
            break
    return hashlib.sha256(f"{seed}\0{component}\0{path}".encode()).digest()


def collect_documents(max_bytes: int, seed: int) -> list[dict]:
    """Pile-format records, about `max_bytes` of text in all, in a fixed shuffled order."""
    py = stdlib_files()
    if not py:
        raise DataError(f"no Python standard library sources found under {sysconfig.get_paths()['stdlib']}")
    sources = {
        "Docs": (doc_files(), text_docs),
        "ManPages": (man_files(), man_docs),
        "Docstrings": ([p for p in py if not _is_test(p)], docstring_docs),
        "Github": (py, github_docs),
    }
    records: list[dict] = []
    used = 0
    for component, (files, make_docs) in sources.items():
        files = list(files)
        files = sorted(files, key=lambda path: _rank(seed, component, path))
        share = int(max_bytes * SHARES[component])
        budget = max(share, max_bytes - used) if component == "Github" else share
        taken = _take(make_docs(files), budget, component)
        used += sum(len(r["text"].encode("utf-8")) for r in taken)
        records += taken
    # the documents' order: another hash, as the one above chose exactly the files with small values
    records.sort(key=lambda r: _rank(seed, "order " + r["meta"]["pile_set_name"], r["meta"]["source"]))
    return records


def build_sample_corpus(out_dir: str, max_mb: float = 20.0, seed: int = 1234, train_shards: int = 2) -> dict:
    """Write OUT_DIR/{train,val,test}/NN.jsonl.zst and manifest.json; return the manifest."""
    if max_mb <= 0:
        raise DataError(f"--max-mb must be positive, got {max_mb}")
    records = collect_documents(int(max_mb * 1e6), seed)
    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for i, record in enumerate(records):
        splits["test" if i % HELD_OUT == 0 else "val" if i % HELD_OUT == 1 else "train"].append(record)
    for split in splits:
        os.makedirs(os.path.join(out_dir, split), exist_ok=True)
    n = len(splits["train"])
    shards = max(1, min(train_shards, n))
    files = {f"train/{k:02d}.jsonl.zst": splits["train"][k * n // shards : (k + 1) * n // shards] for k in range(shards)}
    files["val/00.jsonl.zst"] = splits["val"]
    files["test/00.jsonl.zst"] = splits["test"]
    stale = [n for n in os.listdir(os.path.join(out_dir, "train")) if re.fullmatch(r"\d\d\.jsonl\.zst", n)]
    for name in stale:  # shards of an earlier run with more --train-shards: a glob would pick them up
        if f"train/{name}" not in files:
            os.unlink(os.path.join(out_dir, "train", name))
    compressor = zstandard.ZstdCompressor(level=3)
    manifest = {"seed": seed, "max_mb": max_mb, "files": {}}
    for name, recs in files.items():
        raw = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs).encode("utf-8")
        _atomic_write(os.path.join(out_dir, name), compressor.compress(raw))
        counts: dict[str, int] = {}
        for r in recs:
            counts[r["meta"]["pile_set_name"]] = counts.get(r["meta"]["pile_set_name"], 0) + 1
        manifest["files"][name] = {"documents": len(recs), "raw_bytes": len(raw), "components": dict(sorted(counts.items()))}
    _atomic_write(os.path.join(out_dir, "manifest.json"), (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def add_cli(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    sample = sub.add_parser("sample", help="write a small Pile-format corpus from text on this machine")
    sample.add_argument("out_dir", metavar="OUT_DIR")
    sample.add_argument("--max-mb", type=float, default=20.0, help="raw text size (default 20)")
    sample.add_argument("--seed", type=int, default=1234)
    sample.add_argument("--train-shards", type=int, default=2)


def cli_main(args: argparse.Namespace) -> int:
    try:
        manifest = build_sample_corpus(args.out_dir, args.max_mb, args.seed, args.train_shards)
    except (DataError, OSError) as e:
        print(f"megapile: error: {e}", file=sys.stderr)
        return 1
    for name, info in manifest["files"].items():
        comps = ", ".join(f"{k} {v}" for k, v in info["components"].items())
        print(f"{os.path.join(args.out_dir, name)}: {info['documents']} documents, {info['raw_bytes'] / 1e6:.2f} MB ({comps})")
    return 0
