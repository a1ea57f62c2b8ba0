"""Benchmark: the sample stream (megapile.data.samples) on 1B tokens.

Writes a synthetic dataset of --tokens tokens (documents of random length, mean --doc-len; 2 GB
of disk for 1B tokens, in the page cache afterwards) split in two prefixes blended 0.7/0.3, then prints:
the time to build the index (cold) and to load it from the cache (warm), samples/s for
training-order batches and for random access, the process RSS, and how long the training loop waits for
its batches (megapile.data.loader.Batches) with and without the background read-ahead, over steps that cross
into a new epoch (whose shuffled index is built on first touch), a step being --step-ms of host idle time
(a stand-in for a GPU step).

    python bench/dataloader.py [--tokens 1e9] [--seq-len 2048] [--batch 8] [--step-ms 300]
"""
from __future__ import annotations

import argparse
import os
import struct
import tempfile
import time

import numpy as np
import torch


def write_synthetic(prefix: str, num_tokens: int, mean_doc_len: int, seed: int) -> int:
    """A valid .idx for documents summing to num_tokens, and a .bin of that many uint16 tokens."""
    rng = np.random.default_rng(seed)
    lengths = rng.geometric(1.0 / mean_doc_len, size=int(num_tokens / mean_doc_len * 1.2)).astype(np.int64)
    ends = np.cumsum(lengths)
    n = int(np.searchsorted(ends, num_tokens)) + 1
    lengths = lengths[:n]
    lengths[-1] -= int(ends[n - 1]) - num_tokens
    lengths = lengths[lengths > 0]
    n = len(lengths)
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, n, n + 1))
        f.write(lengths.astype(np.int32).tobytes())
        f.write((np.concatenate([[0], np.cumsum(lengths)[:-1]]) * 2).astype(np.int64).tobytes())
        f.write(np.arange(n + 1, dtype=np.int64).tobytes())
    with open(prefix + ".bin", "wb") as f:  # real bytes: reading holes of a sparse file is not representative
        block = 1 << 24
        for start in range(0, int(lengths.sum()), block):
            count = min(block, int(lengths.sum()) - start)
            f.write(((np.arange(start, start + count, dtype=np.uint64) * 2654435761) % 50000).astype(np.uint16).tobytes())
    return n


def memory_mb() -> dict[str, float]:
    """RssAnon: private memory (what the loader allocates); RssFile: mapped pages of the data files."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1]) / 1024
    return out


def loader_waits(stream, micro: int, accum: int, first: int, steps: int, step_s: float, prefetch: bool):
    """Seconds the loop waits for each step's micro-batches, reading global batches from sample `first` on."""
    from megapile.data.loader import Batches

    batches = Batches(stream, micro * accum, micro, 0, 1, prefetch=prefetch)
    waits = []
    for step in range(steps):
        t = time.perf_counter()
        for _ in batches.micro_batches(first + step * micro * accum, torch.device("cpu")):
            pass
        waits.append(time.perf_counter() - t)
        time.sleep(step_s)  # the step: the host is idle while the device computes
    batches.close()
    return waits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=float, default=1e9)
    p.add_argument("--doc-len", type=int, default=1000, help="mean document length in tokens")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8, help="samples per get_batch call (a micro-batch)")
    p.add_argument("--seconds", type=float, default=3.0, help="time per throughput measurement")
    p.add_argument("--step-ms", type=float, default=300.0, help="simulated step time for the read-ahead measurement")
    args = p.parse_args()

    from megapile.data.samples import build_samples

    with tempfile.TemporaryDirectory() as tmp:
        total = int(args.tokens)
        prefixes = [os.path.join(tmp, "a"), os.path.join(tmp, "b")]
        t = time.perf_counter()
        docs = [write_synthetic(prefixes[0], total * 7 // 10, args.doc_len, 0),
                write_synthetic(prefixes[1], total - total * 7 // 10, args.doc_len, 1)]
        print(f"synthetic data: {total / 1e9:.2f}B tokens, {sum(docs):,} documents, 2 prefixes ({time.perf_counter() - t:.1f} s to write)")
        base = memory_mb()

        t = time.perf_counter()
        stream = build_samples(prefixes, [0.7, 0.3], args.seq_len, seed=1234, cache_dir=os.path.join(tmp, "cache"))
        stream.get_batch(0, args.batch)
        cold = time.perf_counter() - t
        t = time.perf_counter()
        stream = build_samples(prefixes, [0.7, 0.3], args.seq_len, seed=1234, cache_dir=os.path.join(tmp, "cache"))
        stream.get_batch(0, args.batch)
        warm = time.perf_counter() - t
        print(f"index for {total / 1e9:.2f}B tokens ({stream.num_samples_per_epoch:,} samples of {args.seq_len + 1}): "
              f"build {cold:.2f} s cold, {warm:.2f} s from cache")

        n_epoch = stream.num_samples_per_epoch
        for label, starts in (
            ("training order", lambda i: i * args.batch),
            ("random access ", lambda i: int(np.random.default_rng(i).integers(0, n_epoch - args.batch))),
        ):
            n, i, t = 0, 0, time.perf_counter()
            while time.perf_counter() - t < args.seconds:
                n += len(stream.get_batch(starts(i), args.batch))
                i += 1
            dt = time.perf_counter() - t
            print(f"{label}: {n / dt:10,.0f} samples/s = {n * args.seq_len / dt / 1e6:6.1f}M tokens/s "
                  f"(get_batch of {args.batch})")
        t = time.perf_counter()
        stream.get_batch(5 * n_epoch, args.batch)  # two datasets enter a new epoch: two index builds
        print(f"first batch of a later epoch (builds that epoch's index): {time.perf_counter() - t:.2f} s")
        accum, steps = 4, 8
        for epoch, prefetch in ((7, False), (9, True)):  # each run crosses into an epoch not yet built
            first = epoch * n_epoch - 3 * args.batch * accum
            waits = loader_waits(stream, args.batch, accum, first, steps, args.step_ms / 1e3, prefetch)
            print(f"loop waits for its batches, read-ahead {'on ' if prefetch else 'off'}: steps 2-{steps} "
                  f"(global batch {args.batch * accum}, a new epoch from step 4) mean "
                  f"{1e3 * sum(waits[1:]) / (steps - 1):.1f} ms, worst {1e3 * max(waits[1:]):.1f} ms; "
                  f"step 1 {1e3 * waits[0]:.1f} ms")
        now = memory_mb()
        print(f"memory: private (RssAnon) {now['RssAnon']:.0f} MB, {now['RssAnon'] - base['RssAnon']:+.0f} MB for the "
              f"stream; data pages mapped (RssFile) {now['RssFile']:.0f} MB")


if __name__ == "__main__":
    main()
