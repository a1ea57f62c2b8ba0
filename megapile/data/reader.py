"""Stream documents from the Pile's on-disk format, or from a Hugging Face dataset.

The Pile is JSON lines, one document per line, usually zstandard-compressed:

    {"text": "...", "meta": {"pile_set_name": "Github"}}

`JsonlSource` reads `*.jsonl.zst`, `*.jsonl.gz` and plain `*.jsonl` files in constant memory
(a real shard is ~14 GB compressed): it decompresses 1 MB of output at a time, however
compressible the data, and splits lines itself, so no whole file and no line longer than
`max_doc_bytes` is ever held. `HFSource`
wraps any `datasets.Dataset` with a text column behind the same interface.

Two kinds of bad input are told apart:
- a broken *file* (missing, truncated or corrupt compression) raises `DataError` naming the
  file, the line reached and the compressed byte offset;
- a bad *document* (not JSON, no string "text", invalid UTF-8, empty, too long) is skipped and
  counted by reason in a `Skips`, which keeps the first few locations for the summary.
"""
from __future__ import annotations

import glob
import gzip
import json
import os
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional, Union

import zstandard

from megapile.data import DataError

DEFAULT_MAX_DOC_BYTES = 256 << 20  # longer JSON lines are skipped ("too_long") without being held
_READ_SIZE = 1 << 16  # compressed bytes read at a time
_BLOCK_SIZE = 1 << 20  # decompressed bytes handed to the line splitter at a time
SUFFIXES = (".jsonl.zst", ".jsonl.zstd", ".jsonl.gz", ".jsonl", ".json.zst", ".json.gz", ".json")

SKIP_REASONS = {
    "blank_line": "empty line",
    "invalid_json": "line is not valid JSON",
    "invalid_utf8": "not valid UTF-8",
    "missing_text": 'no "text" field',
    "text_not_string": '"text" is not a string',
    "empty_text": '"text" is empty',
    "too_long": "document longer than the maximum size",
    "no_component": 'no meta.pile_set_name (needed to split by component)',
}


@dataclass
class Document:
    text: str
    component: Optional[str]  # meta.pile_set_name, e.g. "Github"; None when absent
    location: str  # "path:line" (or "name:row" for a Hugging Face dataset)


@dataclass
class Skips:
    """Documents skipped, counted by reason, with the first `keep` locations of each reason."""

    keep: int = 5
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, location: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        seen = self.examples.setdefault(reason, [])
        if len(seen) < self.keep:
            seen.append(location)

    def update(self, other: "Skips") -> None:
        for reason, n in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + n
            seen = self.examples.setdefault(reason, [])
            seen.extend(other.examples.get(reason, [])[: self.keep - len(seen)])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        return {r: {"count": n, "first": self.examples.get(r, [])} for r, n in sorted(self.counts.items())}

    def lines(self) -> list[str]:
        """One human-readable line per reason, for the end-of-run summary."""
        out = []
        for reason, n in sorted(self.counts.items()):
            where = ", ".join(self.examples.get(reason, []))
            more = ", ..." if n > len(self.examples.get(reason, [])) else ""
            out.append(f"{reason} ({SKIP_REASONS.get(reason, reason)}): {n} at {where}{more}")
        return out


def expand_inputs(inputs: Union[str, Iterable[str]]) -> list[str]:
    """Files named by paths, globs or directories, sorted; a DataError if any names nothing."""
    patterns = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not patterns:
        raise DataError("no input files given")
    paths: list[str] = []
    for pattern in map(str, patterns):
        if glob.has_magic(pattern):
            found = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not found:
                raise DataError(f"no files match '{pattern}'")
            paths += found
        elif os.path.isdir(pattern):
            found = sorted(
                os.path.join(root, name)
                for root, _, names in os.walk(pattern)
                for name in names
                if name.endswith(SUFFIXES)
            )
            if not found:
                raise DataError(f"no .jsonl/.jsonl.zst/.jsonl.gz files in directory '{pattern}'")
            paths += found
        elif os.path.isfile(pattern):
            paths.append(pattern)
        else:
            raise DataError(f"input file not found: '{pattern}'")
    return paths


def _iter_blocks(path: str) -> Iterator[tuple[bytes, int]]:
    """Decompressed blocks of `path` with the compressed byte offset reached after each.

    Raises _StreamError(offset, message) for truncated or corrupt compressed data.
    """
    kind = "zst" if path.endswith((".zst", ".zstd")) else "gz" if path.endswith(".gz") else "plain"
    try:
        raw = open(path, "rb")
    except OSError as e:
        raise DataError(f"cannot open '{path}': {e.strerror}") from None
    with raw:
        if kind == "plain":
            while block := raw.read(_BLOCK_SIZE):
                yield block, raw.tell()
        elif kind == "gz":
            gz = gzip.GzipFile(fileobj=raw, mode="rb")
            try:
                while block := gz.read(_BLOCK_SIZE):
                    yield block, raw.tell()
            except EOFError:
                raise _StreamError(raw.tell(), "truncated gzip stream (file ends before the end of data)") from None
            except (gzip.BadGzipFile, zlib.error, OSError) as e:
                raise _StreamError(raw.tell(), f"corrupt gzip data ({e})") from None
        else:
            yield from _iter_zstd_blocks(raw)


def _iter_zstd_blocks(raw) -> Iterator[tuple[bytes, int]]:
    """zstd through stream_reader, whose reads are bounded whatever the compression ratio.

    stream_reader ends silently at a truncated frame, so the compressed bytes it reads pass
    through a `_FrameWalker` that follows the frame and block headers and knows whether the
    file ended between frames.
    """
    walker = _FrameWalker()
    tap = _Tap(raw, walker)
    reader = zstandard.ZstdDecompressor().stream_reader(tap, read_size=_READ_SIZE, read_across_frames=True)
    try:
        while block := reader.read(_BLOCK_SIZE):
            yield block, raw.tell()
    except zstandard.ZstdError as e:
        raise _StreamError(raw.tell(), f"corrupt zstd data ({e})") from None
    if not walker.between_frames:
        raise _StreamError(raw.tell(), "truncated zstd stream (file ends inside a frame)")


class _Tap:
    """A read-only file that shows every byte it reads to `walker`."""

    def __init__(self, raw, walker: "_FrameWalker"):
        self.raw, self.walker = raw, walker

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.walker.feed(data)
        return data


class _FrameWalker:
    """Follows zstd's frame format (RFC 8878) header by header, skipping block contents."""

    MAGIC, SKIPPABLE = 0xFD2FB528, 0x184D2A50

    def __init__(self) -> None:
        self.state, self.need, self.skip = "magic", 4, 0
        self.buf = b""
        self.checksum = False

    @property
    def between_frames(self) -> bool:
        return self.state == "magic" and not self.buf and not self.skip

    def feed(self, data: bytes) -> None:
        pos, n = 0, len(data)
        while pos < n:
            if self.skip:
                take = min(self.skip, n - pos)
                pos += take
                self.skip -= take
                continue
            take = min(self.need - len(self.buf), n - pos)
            self.buf += data[pos : pos + take]
            pos += take
            if len(self.buf) == self.need:
                header, self.buf = self.buf, b""
                self._header(header)

    def _header(self, h: bytes) -> None:
        if self.state == "magic":
            magic = int.from_bytes(h, "little")
            if magic & 0xFFFFFFF0 == self.SKIPPABLE:
                self.state, self.need = "skippable", 4
            else:  # not a frame: the decompressor reports the corruption
                self.state, self.need = "descriptor", 1
        elif self.state == "skippable":
            self.state, self.need, self.skip = "magic", 4, int.from_bytes(h, "little")
        elif self.state == "descriptor":
            d = h[0]
            single = (d >> 5) & 1
            self.checksum = bool((d >> 2) & 1)
            fcs = (single, 2, 4, 8)[d >> 6]
            self.skip = (0 if single else 1) + (0, 1, 2, 4)[d & 3] + fcs
            self.state, self.need = "block", 3
        elif self.state == "block":
            value = int.from_bytes(h, "little")
            last, kind, size = value & 1, (value >> 1) & 3, value >> 3
            self.skip = 1 if kind == 1 else size  # RLE blocks store one byte
            if last:
                self.skip += 4 if self.checksum else 0
                self.state, self.need = "magic", 4


class _StreamError(Exception):
    def __init__(self, offset: int, message: str):
        super().__init__(message)
        self.offset = offset
        self.message = message


def iter_lines(path: str, max_line_bytes: int = DEFAULT_MAX_DOC_BYTES) -> Iterator[tuple[int, Optional[bytes], int]]:
    """Yield (line number from 1, line without newline or None if longer than max, compressed offset)."""
    pending: list[bytes] = []
    pending_len, too_long, lineno, offset = 0, False, 0, 0
    try:
        for block, offset in _iter_blocks(path):
            parts = block.split(b"\n")
            for i, part in enumerate(parts):
                last = i == len(parts) - 1
                if not too_long:
                    pending.append(part)
                    pending_len += len(part)
                    if pending_len > max_line_bytes:
                        pending, pending_len, too_long = [], 0, True
                if last:
                    break
                lineno += 1
                if too_long:
                    yield lineno, None, offset
                else:
                    yield lineno, pending[0] if len(pending) == 1 else b"".join(pending), offset
                pending, pending_len, too_long = [], 0, False
    except _StreamError as e:
        raise DataError(
            f"{path}: {e.message} at compressed byte {e.offset}, after line {lineno}"
        ) from None
    if too_long or pending_len:  # last line without a trailing newline
        lineno += 1
        yield lineno, None if too_long else b"".join(pending), offset


def check_text(text: Any) -> Optional[str]:
    """The skip reason for a "text" value, or None if it is a usable document."""
    if text is None:
        return "missing_text"
    if not isinstance(text, str):
        return "text_not_string"
    if not text:
        return "empty_text"
    if not text.isascii():
        try:
            text.encode("utf-8")  # lone surrogates (from "\ud800" escapes) cannot be tokenized
        except UnicodeEncodeError:
            return "invalid_utf8"
    return None


def parse_line(line: Optional[bytes]) -> tuple[Optional[str], Optional[str], Optional[str]]:
    """(text, component, skip_reason) for one JSON line; exactly one of text/skip_reason is set."""
    if line is None:
        return None, None, "too_long"
    if not line.strip():
        return None, None, "blank_line"
    try:
        record = json.loads(line)
    except UnicodeDecodeError:
        return None, None, "invalid_utf8"
    except ValueError:
        return None, None, "invalid_json"
    if not isinstance(record, dict):
        return None, None, "missing_text"
    text = record.get("text")
    reason = check_text(text)
    if reason:
        return None, None, reason
    meta = record.get("meta")
    component = meta.get("pile_set_name") if isinstance(meta, dict) else None
    return text, component if isinstance(component, str) else None, None


@dataclass
class Chunk:
    """A batch of raw documents for a preprocess worker: JSON lines, or already-parsed texts."""

    source: str  # file path or dataset name
    first: int  # line number (or row) of the first item
    lines: Optional[list[Optional[bytes]]] = None
    texts: Optional[list[Any]] = None
    components: Optional[list[Optional[str]]] = None
    progress: int = 0  # input bytes consumed so far in this source (for progress bars)

    def __len__(self) -> int:
        return len(self.lines if self.lines is not None else self.texts)


class _Source:
    """What every document source shares: the component filter and the counted skips."""

    def __init__(self, components: Optional[Iterable[str]], strict: bool):
        self.components = set(components) if components else None
        self.strict = strict
        self.skips = Skips()
        self.filtered = 0  # documents dropped by the component filter

    def _keep(self, text: Optional[str], component: Optional[str], reason: Optional[str],
              location: str) -> Optional[Document]:
        """The document, or None after counting it as skipped (bad) or filtered (other component)."""
        if reason:
            self.skip(reason, location)
        elif self.components is None or component in self.components:
            return Document(text, component, location)
        else:
            self.filtered += 1
        return None

    def skip(self, reason: str, location: str) -> None:
        if self.strict:
            raise DataError(f"{location}: {SKIP_REASONS.get(reason, reason)}")
        self.skips.add(reason, location)


class JsonlSource(_Source):
    """Documents of one or more jsonl(.zst/.gz) files, in file order, in constant memory.

    `components`: keep only documents whose meta.pile_set_name is in this set.
    Iterating yields `Document`s and counts bad lines in `self.skips`; `strict=True` raises
    DataError at the first bad line instead.
    """

    def __init__(
        self,
        inputs: Union[str, Iterable[str]],
        components: Optional[Iterable[str]] = None,
        max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES,
        strict: bool = False,
    ):
        super().__init__(components, strict)
        self.paths = expand_inputs(inputs)
        self.max_doc_bytes = max_doc_bytes

    @property
    def total_bytes(self) -> int:
        return sum(os.path.getsize(p) for p in self.paths)

    def describe(self) -> list[dict[str, Any]]:
        return [{"path": os.path.abspath(p), "bytes": os.path.getsize(p)} for p in self.paths]

    def __iter__(self) -> Iterator[Document]:
        for path in self.paths:
            for lineno, line, _ in iter_lines(path, self.max_doc_bytes):
                text, component, reason = parse_line(line)
                if doc := self._keep(text, component, reason, f"{path}:{lineno}"):
                    yield doc

    def iter_chunks(self, chunk_bytes: int) -> Iterator[Chunk]:
        """Raw lines in chunks of about `chunk_bytes`, for parsing in worker processes."""
        done = 0
        for path in self.paths:
            lines: list[Optional[bytes]] = []
            size, first, offset = 0, 1, 0
            for lineno, line, offset in iter_lines(path, self.max_doc_bytes):
                lines.append(line)
                size += len(line) if line is not None else 0
                if size >= chunk_bytes:
                    yield Chunk(path, first, lines=lines, progress=done + offset)
                    lines, size, first = [], 0, lineno + 1
            if lines:
                yield Chunk(path, first, lines=lines, progress=done + offset)
            done += os.path.getsize(path)


class HFSource(_Source):
    """A Hugging Face `datasets.Dataset` with a text column, behind the JsonlSource interface.

    Example: `HFSource(datasets.load_dataset("json", data_files="x.jsonl", split="train"))`.
    `component_column` may name a field inside a struct column with a dot: "meta.pile_set_name", as the Pile's
    own layout has it.
    """

    def __init__(
        self,
        dataset: Any,
        text_column: str = "text",
        component_column: Optional[str] = None,
        components: Optional[Iterable[str]] = None,
        name: str = "dataset",
        strict: bool = False,
    ):
        for column in (text_column, component_column):
            if column is not None and column.split(".")[0] not in dataset.column_names:
                raise DataError(f"{name}: no column '{column}' (columns: {', '.join(dataset.column_names)})")
        super().__init__(components, strict)
        self.dataset = dataset
        self.text_column = text_column
        self.component_column = component_column
        self.name = name
        self.paths = [name]

    @property
    def total_bytes(self) -> int:
        return int(getattr(self.dataset, "dataset_size", 0) or 0)

    def describe(self) -> list[dict[str, Any]]:
        return [{"dataset": self.name, "rows": len(self.dataset), "fingerprint": getattr(self.dataset, "_fingerprint", None)}]

    def _batches(self, batch_size: int) -> Iterator[tuple[int, list[Any], list[Optional[str]]]]:
        top, *inner = self.component_column.split(".") if self.component_column else [None]
        columns = [self.text_column] + ([top] if top and top != self.text_column else [])
        row = 0
        for batch in self.dataset.select_columns(columns).iter(batch_size=batch_size):
            texts = batch[self.text_column]
            comps = [_field(v, inner) for v in batch[top]] if top else [None] * len(texts)
            yield row, texts, comps
            row += len(texts)

    def __iter__(self) -> Iterator[Document]:
        for row, texts, comps in self._batches(1000):
            for i, (text, comp) in enumerate(zip(texts, comps)):
                if doc := self._keep(text, comp, check_text(text), f"{self.name}:{row + i}"):
                    yield doc

    def iter_chunks(self, chunk_bytes: int) -> Iterator[Chunk]:
        rows = max(1, chunk_bytes // 4096)  # rows are not sized up front; assume ~4 KB each
        for row, texts, comps in self._batches(rows):
            yield Chunk(self.name, row, texts=texts, components=comps, progress=0)


def _field(value: Any, path: list[str]) -> Optional[str]:
    """value["a"]["b"] for path ["a", "b"]; None where a level is missing or the end is not a string."""
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value if isinstance(value, str) else None


Source = Union[JsonlSource, HFSource]
