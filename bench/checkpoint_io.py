"""Checkpoint save/load throughput against the disk's raw sequential write/read speed, in one run.

    python bench/checkpoint_io.py [--layers 8 --hidden 512 --stage 1 --dir /tmp/ckpt_bench]

A megapile save = DeepSpeed's shards + RNG/state JSON + a CRC32 manifest + fsyncs + rename. The baseline
writes the same number of bytes with plain buffered file I/O and one fsync; the ratio is ours / raw write
(goal >= 0.5). Load includes the manifest check (CRC32 of every byte) and DeepSpeed's load; it is shown
against the raw write speed and, for reference, a raw read (which mostly comes from the page cache).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megapile import checkpoint, distributed  # noqa: E402
from megapile.checkpoint import manifest  # noqa: E402
from megapile.config import load_config  # noqa: E402


def raw_write(path: str, nbytes: int, chunk: int = 8 << 20) -> float:
    """Seconds to write nbytes sequentially and fsync them."""
    block = os.urandom(chunk)
    start = time.perf_counter()
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            f.write(block[: min(chunk, left)])
            left -= chunk
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - start


def raw_read(path: str, chunk: int = 8 << 20) -> float:
    start = time.perf_counter()
    with open(path, "rb") as f:
        while f.read(chunk):
            pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--stage", type=int, default=1, choices=[0, 1, 2, 3])
    parser.add_argument("--dir", default="/tmp/megapile_ckpt_bench")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from megapile.model import build_model
    from megapile.parallel.ds_config import resolve_ds_config
    from megapile.parallel.layout import Layout
    from megapile.parallel.parallelize import parallelize

    cfg = load_config(None, [f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}",
                             "model.num_heads=8", f"model.vocab_size={args.vocab}", "train.micro_batch_size=1",
                             "train.global_batch_size=1", f"checkpoint.keep_last={args.repeats + 1}"])
    env = distributed.detect({})
    distributed.init(env, backend="gloo")
    model = build_model(cfg.model, seed=0)
    ds = resolve_ds_config({"zero_optimization": {"stage": args.stage}}, cfg, 1, "fp32", "bench")
    engine = parallelize(cfg, Layout(1, 1, 1, 1), model, ds).engine
    x = torch.randint(0, args.vocab, (1, 16))
    engine.backward(engine(x, targets=x))  # one step so the Adam moments exist and are saved
    engine.step()

    shutil.rmtree(args.dir, ignore_errors=True)
    saves, loads = [], []
    for step in range(1, args.repeats + 1):
        t = time.perf_counter()
        checkpoint.save(engine, args.dir, step, {"step": step, "sample_index": 0, "tokens_seen": 0,
                                                 "world_size": 1, "zero_stage": args.stage,
                                                 "config": cfg.to_dict()}, cfg.checkpoint, True)
        saves.append(time.perf_counter() - t)
        t = time.perf_counter()
        found = checkpoint.find_resumable(args.dir)
        checkpoint.load(engine, found, 0, 1)
        loads.append(time.perf_counter() - t)
    size = manifest.total_bytes(os.path.join(args.dir, f"global_step{args.repeats}"))
    raw_path = os.path.join(args.dir, "raw.bin")
    raw_w = min(raw_write(raw_path, size) for _ in range(args.repeats))
    raw_r = min(raw_read(raw_path) for _ in range(args.repeats))
    os.remove(raw_path)

    mb = size / 1e6
    save_s, load_s = min(saves), min(loads)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {n_params / 1e6:.1f}M params, ZeRO-{args.stage}, checkpoint {mb:.1f} MB in {args.dir} "
          f"(best of {args.repeats})")
    print(f"raw sequential write {mb / raw_w:.0f} MB/s (with fsync), raw read {mb / raw_r:.0f} MB/s (page cache)")
    print(f"{'':10}{'megapile MB/s':>15}{'/ raw write':>12}{'/ raw read':>12}")
    print(f"{'save':10}{mb / save_s:15.0f}{raw_w / save_s:12.2f}{'':>12}")
    print(f"{'load':10}{mb / load_s:15.0f}{raw_w / load_s:12.2f}{raw_r / load_s:12.2f}")
    distributed.shutdown()


if __name__ == "__main__":
    main()
