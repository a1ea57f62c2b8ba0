"""`megapile preprocess`: documents -> tokens + end-of-document -> Megatron .bin/.idx.

    megapile preprocess --input 'sample/train/*.jsonl.zst' --tokenizer tok/tokenizer.json \\
        --output-prefix data/pile --workers 4 [--split-by-component]

How it is fast and bounded:
- the main process only decompresses and splits lines, handing ~2 MB chunks of raw JSON lines
  to worker processes, which parse, validate and `encode_batch` them;
- at most 2 x workers + 1 chunks are in flight, and results are taken back in submission
  order, so output order equals input order and memory does not grow with the input;
- tokens are appended to the .bin as they arrive; the .idx is written at the end from a
  lengths side-file (see `indexed.py`), and every file is renamed into place only when whole.

Next to `prefix.bin`/`prefix.idx` goes `prefix.json`: tokenizer fingerprint, counts, skips and
source files. Bad documents are skipped and counted by reason (see `reader.SKIP_REASONS`);
`--strict` makes the first one an error instead. Broken files are always errors.
"""
from __future__ import annotations

import argparse
import collections
import itertools
import multiprocessing
import os
import re
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Union

import numpy as np
from tqdm import tqdm

from megapile import __version__
from megapile.data import DataError
from megapile.data.indexed import IndexedDatasetWriter, token_dtype
from megapile.data.reader import (
    DEFAULT_MAX_DOC_BYTES,
    SKIP_REASONS,
    Chunk,
    HFSource,
    JsonlSource,
    Skips,
    check_text,
    parse_line,
)
from megapile.data.tokenizer import Tokenizer, load_tokenizer

DEFAULT_CHUNK_BYTES = 2 << 20
SKIP_REASONS.setdefault("tokenizer_error", "the tokenizer failed on this text")


@dataclass
class PreprocessResult:
    outputs: dict[str, str]  # component name ("" when not split) -> output prefix
    documents: int = 0
    tokens: int = 0
    input_bytes: int = 0  # uncompressed JSON bytes read
    filtered: int = 0  # documents of other components when filtering by component
    seconds: float = 0.0
    skips: Skips = field(default_factory=Skips)
    per_component: dict[str, dict[str, int]] = field(default_factory=dict)

    def summary(self) -> list[str]:
        s = max(self.seconds, 1e-9)
        lines = [
            f"{self.documents:,} documents, {self.tokens:,} tokens, {self.input_bytes / 1e6:,.1f} MB in {self.seconds:.1f} s "
            f"({self.documents / s:,.0f} docs/s, {self.input_bytes / 1e6 / s:,.2f} MB/s, {self.tokens / s:,.0f} tokens/s)"
        ]
        for name, prefix in sorted(self.outputs.items()):
            counts = self.per_component.get(name, {})
            label = f" [{name}]" if name else ""
            lines.append(f"wrote {prefix}.bin/.idx/.json{label}: {counts.get('documents', 0):,} documents, {counts.get('tokens', 0):,} tokens")
        if self.filtered:
            lines.append(f"left out {self.filtered:,} documents of other components")
        lines.append(f"skipped {self.skips.total:,} documents" + (":" if self.skips.total else ""))
        lines += [f"  {line}" for line in self.skips.lines()]
        return lines


# ---- worker side -----------------------------------------------------------------------------

_tokenizer: Optional[Tokenizer] = None


def _init_worker(tokenizer_path: str, fingerprint: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker; the pool is the parallelism
    global _tokenizer
    _tokenizer = load_tokenizer(tokenizer_path)
    if _tokenizer.fingerprint != fingerprint:
        raise DataError(f"{tokenizer_path}: the tokenizer file changed while preprocessing started")


@dataclass
class _ChunkResult:
    tokens: dict[str, np.ndarray]  # component ("" unless split) -> flat tokens, EOD after each doc
    lengths: dict[str, np.ndarray]
    text_bytes: dict[str, int]  # UTF-8 bytes of the tokenized texts: the denominator of bits per byte
    skips: Skips
    filtered: int
    input_bytes: int
    progress: int


def _process(chunk: Chunk, components: Optional[frozenset], split: bool, dtype: np.dtype) -> _ChunkResult:
    """Parse, validate, filter and tokenize one chunk (runs in a worker)."""
    tok = _tokenizer
    skips = Skips()
    texts: list[str] = []
    groups: list[str] = []
    locations: list[str] = []
    filtered = 0
    if chunk.lines is not None:
        items = (parse_line(line) for line in chunk.lines)
        input_bytes = sum(len(line) + 1 for line in chunk.lines if line is not None)
    else:
        items = ((t, c, check_text(t)) for t, c in zip(chunk.texts, chunk.components))
        input_bytes = sum(len(t) for t in chunk.texts if isinstance(t, str))
    for i, (text, component, reason) in enumerate(items):
        if reason:
            skips.add(reason, f"{chunk.source}:{chunk.first + i}")
        elif components is not None and component not in components:
            filtered += 1
        elif split and component is None:
            skips.add("no_component", f"{chunk.source}:{chunk.first + i}")
        else:
            texts.append(text)
            groups.append(component if split else "")
            locations.append(f"{chunk.source}:{chunk.first + i}")
    ids = _encode_all(tok, texts, locations, skips)
    by_group: dict[str, list[list[int]]] = collections.defaultdict(list)
    text_bytes: dict[str, int] = collections.defaultdict(int)
    for group, doc, text in zip(groups, ids, texts):
        if doc is not None:
            by_group[group].append(doc)
            text_bytes[group] += len(text.encode("utf-8"))
    eod = [tok.eod_id]
    tokens, lengths = {}, {}
    for group, docs in by_group.items():
        lengths[group] = np.fromiter((len(d) + 1 for d in docs), dtype=np.int64, count=len(docs))
        flat = itertools.chain.from_iterable(itertools.chain.from_iterable(zip(docs, itertools.repeat(eod))))
        tokens[group] = np.fromiter(flat, dtype=dtype, count=int(lengths[group].sum()))
    return _ChunkResult(tokens, lengths, dict(text_bytes), skips, filtered, input_bytes, chunk.progress)


def _encode_all(tok: Tokenizer, texts: list[str], locations: list[str], skips: Skips) -> list[Optional[list[int]]]:
    try:
        return tok.encode_batch(texts)
    except Exception:  # find the one text the tokenizer refuses; keep the rest
        out: list[Optional[list[int]]] = []
        for text, location in zip(texts, locations):
            try:
                out.append(tok.encode(text))
            except Exception:
                skips.add("tokenizer_error", location)
                out.append(None)
        return out


# ---- main side -------------------------------------------------------------------------------


def component_prefix(prefix: str, component: str) -> str:
    """`data/pile` + `Gutenberg (PG-19)` -> `data/pile_Gutenberg_PG-19`."""
    return f"{prefix}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', component).strip('_') or 'unnamed'}"


def preprocess(
    source: Union[str, Iterable[str], JsonlSource, HFSource],
    tokenizer: Union[str, Tokenizer],
    output_prefix: str,
    workers: int = 1,
    split_by_component: bool = False,
    components: Optional[Iterable[str]] = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES,
    strict: bool = False,
    progress: bool = False,
) -> PreprocessResult:
    """Tokenize every document of `source` into `output_prefix`.bin/.idx/.json (one set per component if split)."""
    start = time.perf_counter()
    if not isinstance(source, (JsonlSource, HFSource)):
        source = JsonlSource(source, components=components, max_doc_bytes=max_doc_bytes)
    filter_ = frozenset(components) if components else (frozenset(source.components) if source.components else None)
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    dtype = token_dtype(tok.vocab_size)
    output_prefix = str(output_prefix)
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    if not os.path.isdir(out_dir):
        raise DataError(f"output directory '{os.path.dirname(output_prefix)}' does not exist (for --output-prefix '{output_prefix}')")
    bar = _progress_bar(source, progress)

    with ExitStack() as stack:
        stack.callback(bar.close)
        outputs = _Outputs(stack, output_prefix, dtype, split_by_component, strict, bar, start)
        chunks = source.iter_chunks(chunk_bytes)
        task = (filter_, split_by_component, dtype)  # _process's arguments after the chunk
        if workers <= 1:
            _run_here(chunks, tok, task, outputs.consume)
        else:
            _run_in_pool(chunks, workers, tok, task, outputs.consume, stack)

        result = outputs.result
        result.skips.update(source.skips)
        result.seconds = time.perf_counter() - start
        for group, writer in outputs.writers.items():
            writer.finalize(sidecar=_sidecar(result, group, writer, tok, source, split_by_component))
    return result


class _Outputs:
    """One run's writers (one per component when split, each entered into `stack` when first needed) and its
    running totals; `consume` takes each chunk's tokens in input order."""

    def __init__(self, stack: ExitStack, output_prefix: str, dtype: np.dtype, split: bool, strict: bool, bar,
                 start: float):
        self.stack, self.output_prefix, self.dtype, self.split, self.strict = stack, output_prefix, dtype, split, strict
        self.bar, self.start = bar, start
        self.result = PreprocessResult(outputs={})
        self.writers: dict[str, IndexedDatasetWriter] = {}
        if not split:
            self.writer_for("")

    def writer_for(self, group: str) -> IndexedDatasetWriter:
        if group not in self.writers:
            prefix = component_prefix(self.output_prefix, group) if self.split else self.output_prefix
            self.writers[group] = self.stack.enter_context(IndexedDatasetWriter(prefix, self.dtype))
            self.result.outputs[group] = prefix
        return self.writers[group]

    def consume(self, r: _ChunkResult) -> None:
        result, bar = self.result, self.bar
        if self.strict and r.skips.total:
            reason, where = next((k, v[0]) for k, v in r.skips.examples.items() if v)
            raise DataError(f"{where}: {SKIP_REASONS.get(reason, reason)}")
        for group, tokens in r.tokens.items():
            self.writer_for(group).add_documents(tokens, r.lengths[group])
            counts = result.per_component.setdefault(group, {"documents": 0, "tokens": 0, "text_bytes": 0})
            counts["documents"] += len(r.lengths[group])
            counts["tokens"] += len(tokens)
            counts["text_bytes"] += r.text_bytes[group]
            result.documents += len(r.lengths[group])
            result.tokens += len(tokens)
        result.skips.update(r.skips)
        result.filtered += r.filtered
        result.input_bytes += r.input_bytes
        bar.update(max(0, r.progress - bar.n))
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        bar.set_postfix_str(f"{result.documents / elapsed:,.0f} docs/s, {result.input_bytes / 1e6 / elapsed:,.2f} MB/s", refresh=False)


def _run_here(chunks: Iterable[Chunk], tok: Tokenizer, task: tuple, consume) -> None:
    """workers <= 1: tokenize every chunk in this process."""
    global _tokenizer
    _tokenizer = tok
    for chunk in chunks:
        consume(_process(chunk, *task))


def _run_in_pool(chunks: Iterable[Chunk], workers: int, tok: Tokenizer, task: tuple, consume, stack: ExitStack) -> None:
    """Tokenize in `workers` spawned processes, at most 2 x workers + 1 chunks in flight, results in input order."""
    # ProcessPoolExecutor, not multiprocessing.Pool: a worker that dies (killed for memory, or
    # unable to start) raises BrokenProcessPool here instead of hanging the run forever.
    pool = ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker, initargs=(tok.path, tok.fingerprint)
    )
    stack.callback(pool.shutdown, wait=True, cancel_futures=True)
    pending: collections.deque = collections.deque()
    for chunk in chunks:
        pending.append(pool.submit(_process, chunk, *task))
        if len(pending) > 2 * workers:
            consume(pending.popleft().result())
    while pending:
        consume(pending.popleft().result())


def _sidecar(result: PreprocessResult, group: str, writer: IndexedDatasetWriter, tok: Tokenizer, source, split: bool) -> dict[str, Any]:
    return {
        "format": "megatron-mmap-indexed-dataset v1",
        "component": group or None,
        "documents": writer.num_documents,
        "tokens": writer.num_tokens,
        "text_bytes": result.per_component.get(group, {}).get("text_bytes", 0),  # UTF-8 bytes of its documents
        "dtype": writer.dtype.name,
        "tokenizer": {
            "path": tok.path,
            "sha256": tok.fingerprint,
            "vocab_size": tok.vocab_size,
            "eod_id": tok.eod_id,
            "pad_id": tok.pad_id,
        },
        "run": {
            "documents": result.documents,
            "tokens": result.tokens,
            "input_bytes": result.input_bytes,
            "filtered": result.filtered,
            "split_by_component": split,
            "skipped": result.skips.to_dict(),
            "seconds": round(result.seconds, 3),
        },
        "sources": source.describe(),
        "megapile_version": __version__,
    }


class _NoBar:
    n = 0

    def update(self, k: int) -> None:
        self.n += k

    def set_postfix_str(self, *a, **k) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(source, enabled: bool):
    if not enabled:
        return _NoBar()
    width = shutil.get_terminal_size((100, 24)).columns  # a terminal that reports 0 columns gets 100
    return tqdm(total=source.total_bytes or None, unit="B", unit_scale=True, desc="preprocess", file=sys.stderr, ncols=width)


# ---- command line ----------------------------------------------------------------------------


def add_cli(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="files, globs or directories of jsonl(.zst/.gz)")
    source.add_argument("--hf-dataset", metavar="NAME",
                        help="a Hugging Face `datasets` source instead: a builder with --hf-data-files (json, "
                             "parquet, text, ...) or a Hub name when online")
    parser.add_argument("--hf-data-files", nargs="+", help="with --hf-dataset: the files the builder reads")
    parser.add_argument("--hf-config", help="with --hf-dataset: the dataset's configuration name")
    parser.add_argument("--hf-split", default="train", help="with --hf-dataset: the split (default train)")
    parser.add_argument("--hf-cache-dir", help="with --hf-dataset: where `datasets` caches (default its own)")
    parser.add_argument("--text-column", default="text", help="with --hf-dataset: the text column (default text)")
    parser.add_argument("--component-column", default=None,
                        help="with --hf-dataset: the Pile component column, dots for nested fields "
                             "(the Pile's layout: meta.pile_set_name)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer.json, HF tokenizer dir, or GPT-2 vocab+merges dir")
    parser.add_argument("--output-prefix", required=True, help="write PREFIX.bin, PREFIX.idx, PREFIX.json")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="tokenizer processes")
    parser.add_argument("--split-by-component", action="store_true", help="one dataset per Pile component: PREFIX_Github.bin ...")
    parser.add_argument("--component", action="append", help="keep only this Pile component (repeatable)")
    parser.add_argument("--chunk-mb", type=float, default=DEFAULT_CHUNK_BYTES / 2**20, help="MB of input per worker task")
    parser.add_argument("--max-doc-mb", type=float, default=DEFAULT_MAX_DOC_BYTES / 2**20, help="skip longer documents")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad document instead of skipping it")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _hf_source(args: argparse.Namespace) -> HFSource:
    """--hf-dataset and its options as an HFSource; loading failures become one-line DataErrors."""
    # lazy: ~1 s to import, paid again by every spawned worker (they import this module); only --hf-dataset needs it
    import datasets

    try:
        ds = datasets.load_dataset(args.hf_dataset, args.hf_config, data_files=args.hf_data_files,
                                   split=args.hf_split, cache_dir=args.hf_cache_dir)
    except Exception as e:  # datasets raises many kinds (FileNotFoundError, DatasetNotFoundError, ValueError, ...)
        raise DataError(f"--hf-dataset {args.hf_dataset}: {' '.join(str(e).split())[:300]}") from None
    return HFSource(ds, text_column=args.text_column, component_column=args.component_column,
                    components=args.component, name=args.hf_dataset, strict=args.strict)


def cli_main(args: argparse.Namespace) -> int:
    try:
        result = preprocess(
            _hf_source(args) if args.hf_dataset else args.input,
            args.tokenizer,
            args.output_prefix,
            workers=args.workers,
            split_by_component=args.split_by_component,
            components=args.component,
            chunk_bytes=int(args.chunk_mb * 2**20),
            max_doc_bytes=int(args.max_doc_mb * 2**20),
            strict=args.strict,
            progress=not args.no_progress and sys.stderr.isatty(),
        )
    except DataError as e:
        print(f"megapile: error: {e}", file=sys.stderr)
        return 1
    except BrokenProcessPool:
        print("megapile: error: a tokenizer worker process died (out of memory? try fewer --workers); nothing was written",
              file=sys.stderr)
        return 1
    print("\n".join(result.summary()))
    return 0
