"""Benchmark: `megapile preprocess` against Hugging Face `datasets` .map(batched=True) tokenization.

Same input (the built-in sample corpus, train split), same tokenizer, same number of processes.
Prints documents/s and MB/s of both and their ratio, then the peak memory of preprocess on an
input 10x larger, to show that memory does not grow with the input.

    python bench/preprocess.py [--mb 20] [--workers 2] [--vocab 8192] [--tokenizer PATH]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

import zstandard


def hf_tokenize(files: list[str], tokenizer_path: str, workers: int, cache_dir: str, call: str) -> tuple[float, float, int]:
    """(seconds to load, seconds to map, documents) for load_dataset("json") + map(batched=True).

    call="fast": the very call megapile makes (Tokenizer.encode_batch_fast, no offsets);
    call="classic": tokenizers' documented Tokenizer.encode_batch, which also computes offsets.
    """
    import datasets

    from megapile.data.tokenizer import load_tokenizer

    datasets.disable_progress_bars()
    tok = load_tokenizer(tokenizer_path)
    eod = tok.eod_id
    t0 = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=files, split="train", cache_dir=cache_dir)
    t1 = time.perf_counter()

    backend = tok.backend

    def encode(batch):
        if call == "fast":
            return {"input_ids": [ids + [eod] for ids in tok.encode_batch(batch["text"])]}
        return {"input_ids": [e.ids + [eod] for e in backend.encode_batch(batch["text"], add_special_tokens=False)]}

    out = ds.map(encode, batched=True, batch_size=1000, num_proc=workers if workers > 1 else None,
                 remove_columns=ds.column_names)
    t2 = time.perf_counter()
    assert len(out) == len(ds)
    return t1 - t0, t2 - t1, len(ds)


def run_ours(files: list[str], tokenizer_path: str, prefix: str, workers: int, chunk_bytes: int = 2 << 20) -> dict:
    """Preprocess in a fresh process; report its time and the peak RSS of it and of its workers.

    The main's peak is VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork + exec, so it would
    report this (large) benchmark process instead.
    """
    code = (
        "import json, resource, sys, time\n"
        "from megapile.data.preprocess import preprocess\n"
        "t = time.perf_counter()\n"
        f"r = preprocess({files!r}, {tokenizer_path!r}, {prefix!r}, workers={workers}, chunk_bytes={chunk_bytes})\n"
        "print(json.dumps({'seconds': time.perf_counter() - t, 'documents': r.documents, 'tokens': r.tokens,\n"
        "  'input_bytes': r.input_bytes,\n"
        "  'rss_main_mb': int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]) / 1024,\n"
        "  'rss_worker_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def repeat_corpus(files: list[str], times: int, out: str) -> str:
    """One .jsonl.zst holding the input `times` over, written streaming."""
    dctx, cctx = zstandard.ZstdDecompressor(), zstandard.ZstdCompressor(level=3)
    with open(out, "wb") as f, cctx.stream_writer(f) as w:
        for _ in range(times):
            for path in files:
                with open(path, "rb") as src, dctx.stream_reader(src) as r:
                    while block := r.read(1 << 20):
                        w.write(block)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=20.0, help="sample corpus size for the speed comparison")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--tokenizer", help="use this tokenizer instead of training one")
    p.add_argument("--memory-base-mb", type=float, default=5.0, help="memory test: this input, then 10x it")
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # both sides: one thread per process

    from megapile.data.reader import JsonlSource
    from megapile.data.sample_corpus import build_sample_corpus
    from megapile.data.tokenizer import train_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        build_sample_corpus(os.path.join(tmp, "corpus"), max_mb=args.mb)
        files = sorted(glob.glob(os.path.join(tmp, "corpus", "train", "*.jsonl.zst")))
        tok_path = args.tokenizer or os.path.join(tmp, "tokenizer.json")
        if not args.tokenizer:
            train_tokenizer((d.text for d in JsonlSource(files)), args.vocab, tok_path)

        ours = run_ours(files, tok_path, os.path.join(tmp, "ours"), args.workers)
        mb = ours["input_bytes"] / 1e6
        docs = ours["documents"]
        print(f"input: {docs:,} documents, {mb:.1f} MB of JSON lines, {ours['tokens']:,} tokens; {args.workers} workers")
        print(f"megapile preprocess (to .bin/.idx)     : {ours['seconds']:6.2f} s  {docs / ours['seconds']:8,.0f} docs/s  {mb / ours['seconds']:6.2f} MB/s")
        for call in ("fast", "classic"):
            load_s, map_s, n = hf_tokenize(files, tok_path, args.workers, os.path.join(tmp, f"hf-{call}"), call)
            assert n == docs, (n, docs)
            hf_s = load_s + map_s
            name = "encode_batch_fast" if call == "fast" else "encode_batch"
            print(f"HF load_dataset + map, {name:<17}: {hf_s:6.2f} s  {docs / hf_s:8,.0f} docs/s  {mb / hf_s:6.2f} MB/s"
                  f"  (load {load_s:.2f} s + map {map_s:.2f} s) -> megapile is {hf_s / ours['seconds']:.2f}x faster")
        t = time.perf_counter()
        from megapile.data.tokenizer import load_tokenizer

        tok = load_tokenizer(tok_path)
        for chunk in JsonlSource(files).iter_chunks(2 << 20):
            tok.encode_batch([json.loads(line)["text"] for line in chunk.lines])
        alone = time.perf_counter() - t
        print(f"floor: encode_batch_fast alone, 1 process: {alone:.2f} s = {mb / alone:.2f} MB/s per core "
              f"(x{args.workers} workers = {args.workers * mb / alone:.2f} MB/s if perfectly parallel)")

        small = repeat_corpus(files, 1, os.path.join(tmp, "small.jsonl.zst"))
        cut = JsonlSource(small)
        part = os.path.join(tmp, "base.jsonl.zst")
        with open(part, "wb") as f, zstandard.ZstdCompressor().stream_writer(f) as w:
            size = 0
            for d in cut:
                line = (json.dumps({"text": d.text, "meta": {"pile_set_name": d.component}}) + "\n").encode()
                w.write(line)
                size += len(line)
                if size >= args.memory_base_mb * 1e6:
                    break
        big = repeat_corpus([part], 10, os.path.join(tmp, "big.jsonl.zst"))
        for label, path in (("1x", part), ("10x", big)):
            # 256 KB chunks: the pipeline (2 x workers + 1 chunks in flight) is full in both runs
            r = run_ours([path], tok_path, os.path.join(tmp, f"mem{label}"), args.workers, chunk_bytes=256 << 10)
            print(f"memory, {label:>3} input ({r['input_bytes'] / 1e6:6.1f} MB, {r['documents']:,} docs): "
                  f"peak RSS main {r['rss_main_mb']:.0f} MB, largest worker {r['rss_worker_mb']:.0f} MB, {r['seconds']:.1f} s")


if __name__ == "__main__":
    main()
