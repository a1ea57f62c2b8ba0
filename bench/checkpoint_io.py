"""Checkpoint I/O against the disk, and the memory a reshard takes, side by side in one run.

    python bench/checkpoint_io.py [--layers 8 --hidden 512 --vocab 8192 --dir /tmp/megapile_ckpt_bench]

1. Throughput, one process, ZeRO-1. A megapile save = DeepSpeed's shards + this rank's layout-free slices + state
   JSON + a CRC32 manifest + fsyncs + rename; the training loop is blocked for all of it (the save is
   synchronous), so "blocked per save" is its wall time. The baseline writes the same number of bytes with plain
   buffered I/O and one fsync. Load: the same-layout resume (DeepSpeed's shards, manifest check with CRC32 of every
   byte) and a resume from the slices alone (what a layout change reads), against the raw write speed and a raw
   read (mostly the page cache).
2. Reshard memory, 2 ranks (this script under torchrun, started by part 1): a ZeRO-1 checkpoint loaded into a
   ZeRO-3 engine. Peak extra resident memory of each rank during the load (the kernel's high-water mark, reset
   before it, minus the resident size before it), as a multiple of the rank's own shard (its slice of the fp32
   masters and both Adam moments): through the slices each rank reads only what it holds; through full tensors
   (what megapile did before the slices existed, and still does for older checkpoints; here read from the slices)
   every rank holds the whole model's masters and moments.
"""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megapile import checkpoint  # noqa: E402
from megapile.checkpoint import collective, fragments, manifest, portable, slices  # noqa: E402
from megapile.config import load_config  # noqa: E402
from megapile.model import build_model  # noqa: E402
from megapile.parallel.ds_config import resolve_ds_config  # noqa: E402
from megapile.parallel.layout import Layout  # noqa: E402
from megapile.parallel.parallelize import parallelize  # noqa: E402
from megapile.runtime import distributed  # noqa: E402


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


def _engine(args, stage: int, world: int):
    cfg = load_config(None, [f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}",
                             "model.num_heads=8", f"model.vocab_size={args.vocab}", "train.micro_batch_size=1",
                             f"train.global_batch_size={world}", f"checkpoint.keep_last={args.repeats + 1}"])
    model = build_model(cfg.model, seed=0)
    ds = resolve_ds_config({"zero_optimization": {"stage": stage, "overlap_comm": False}}, cfg, world, "fp32",
                           "bench")
    layout = Layout(world, 1, 1, world)
    return cfg, layout, parallelize(cfg, layout, model, ds).engine


def _train_one_step(engine, vocab: int) -> None:
    """One step, so that the Adam moments exist and are saved."""
    x = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(0))
    engine.backward(engine(x, targets=x))
    engine.step()


def _save(engine, cfg, layout, directory: str, step: int, rank: int) -> None:
    collective.save(engine, directory, step, {"step": step, "sample_index": 0, "tokens_seen": 0, "world_size":
                                              layout.world, "zero_stage": engine.zero_optimization_stage(),
                                              "config": cfg.to_dict()}, cfg.checkpoint, rank == 0,
                    collective.Slices(layout, rank, cfg.model.num_layers))


def throughput(args) -> None:
    env = distributed.detect({})
    distributed.init(env, backend="gloo")
    cfg, layout, engine = _engine(args, 1, 1)
    _train_one_step(engine, args.vocab)
    shutil.rmtree(args.dir, ignore_errors=True)
    saves, loads, slice_loads = [], [], []
    for step in range(1, args.repeats + 1):
        t = time.perf_counter()
        _save(engine, cfg, layout, args.dir, step, 0)
        saves.append(time.perf_counter() - t)
        t = time.perf_counter()
        found = checkpoint.find_resumable(args.dir)
        collective.load(engine, found, collective.Slices(layout, 0, cfg.model.num_layers))
        loads.append(time.perf_counter() - t)
        t = time.perf_counter()
        found = checkpoint.find_resumable(args.dir)
        slices.load(engine, fragments.Stored(found.path), layout, 0, cfg.model.num_layers, cfg.model.family.tensor_plan)
        slice_loads.append(time.perf_counter() - t)
    final = os.path.join(args.dir, f"global_step{args.repeats}")
    size = manifest.total_bytes(final)
    slice_bytes = sum(os.path.getsize(os.path.join(final, fragments.DIR, f))
                      for f in os.listdir(os.path.join(final, fragments.DIR)))
    raw_path = os.path.join(args.dir, "raw.bin")
    raw_w = min(raw_write(raw_path, size) for _ in range(args.repeats))
    raw_r = min(raw_read(raw_path) for _ in range(args.repeats))
    os.remove(raw_path)

    mb = size / 1e6
    save_s, load_s, slice_s = min(saves), min(loads), min(slice_loads)
    n_params = sum(p.numel() for p in engine.module.parameters())
    print(f"model {n_params / 1e6:.1f}M params, ZeRO-1, 1 rank, checkpoint {mb:.1f} MB in {args.dir} "
          f"({slice_bytes / 1e6:.1f} MB of it the layout-free slices; best of {args.repeats})")
    print(f"raw sequential write {mb / raw_w:.0f} MB/s (with fsync), raw read {mb / raw_r:.0f} MB/s (page cache)")
    print(f"{'':28}{'MB/s':>8}{'/ raw write':>12}{'/ raw read':>12}")
    print(f"{'save':28}{mb / save_s:8.0f}{raw_w / save_s:12.2f}{'':>12}   loop blocked {save_s:.2f} s per save")
    print(f"{'load, same layout':28}{mb / load_s:8.0f}{raw_w / load_s:12.2f}{raw_r / load_s:12.2f}")
    slice_mb = slice_bytes / 1e6
    print(f"{'load, slices (any layout)':28}{slice_mb / slice_s:8.0f}{(raw_w * slice_mb / mb) / slice_s:12.2f}"
          f"{(raw_r * slice_mb / mb) / slice_s:12.2f}")
    distributed.shutdown()


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _peak_extra_mb(load) -> float:
    """Peak resident memory above the current resident size while `load()` runs, in MB."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark (VmHWM) to the current resident size
    before = _rss_kb("VmRSS")
    load()
    return (_rss_kb("VmHWM") - before) / 1e3


def _full_state(path: str) -> portable.FullState:
    """Every parameter's full master and moments in this process: what a reshard held on every rank before the
    slices (and still does for checkpoints written before them)."""
    stored = fragments.Stored(path)
    full = {kind: {name: stored.full(name, kind) for name in stored.params} for kind in fragments.KINDS}
    return portable.FullState({**full, "step": stored.step, "lr_scheduler": stored.lr_scheduler})


def reshard_memory(args) -> None:
    env = distributed.detect(dict(os.environ))
    distributed.init(env, backend="gloo")
    cfg, layout, engine = _engine(args, 1, env.world_size)
    _train_one_step(engine, args.vocab)
    directory = os.path.join(args.dir, "reshard")
    _save(engine, cfg, layout, directory, 1, env.rank)
    engine.destroy()
    del engine
    cfg, layout, engine = _engine(args, 3, env.world_size)
    path = os.path.join(directory, "global_step1")
    accessor = slices.holder(engine)
    held = slices.held(engine, layout, env.rank, cfg.model.num_layers, cfg.model.family.tensor_plan)
    shard_mb = sum(e - s for h in held if (span := accessor.span(h)) for s, e in [span]) * 12 / 1e6
    new = _peak_extra_mb(lambda: slices.load(engine, fragments.Stored(path), layout, env.rank, cfg.model.num_layers,
                                                    cfg.model.family.tensor_plan))
    old = _peak_extra_mb(lambda: slices.load(engine, _full_state(path), layout, env.rank, cfg.model.num_layers,
                                                    cfg.model.family.tensor_plan))
    figures = [None] * env.world_size
    torch.distributed.all_gather_object(figures, (shard_mb, new, old))
    if env.rank == 0:
        print(f"reshard ZeRO-1 -> ZeRO-3 on {env.world_size} ranks: peak extra resident memory per rank during the "
              "load, as a multiple of the rank's own shard (fp32 master + 2 Adam moments)")
        for rank, (shard, new_mb, old_mb) in enumerate(figures):
            print(f"  rank {rank}: shard {shard:.0f} MB; slices {new_mb:.0f} MB = {new_mb / shard:.2f}x; "
                  f"full tensors {old_mb:.0f} MB = {old_mb / shard:.2f}x")
    engine.destroy()
    distributed.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--dir", default="/tmp/megapile_ckpt_bench")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reshard-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reshard_worker:
        reshard_memory(args)
        return
    throughput(args)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29631",
           os.path.abspath(__file__), "--reshard-worker"] + sys.argv[1:]
    subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))


if __name__ == "__main__":
    main()
