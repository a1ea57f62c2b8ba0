"""Checkpoint I/O against the disk, what a save blocks training for (synchronous vs asynchronous), and the memory a
reshard takes, side by side in one run.

    python bench/checkpoint_io.py [--shapes tiny,160m --dir /tmp/megapile_ckpt_bench --repeats 3]

1. Blocked per save, one process, ZeRO-1, fp32, at each shape (configs/tiny.yaml with a 1024-token vocabulary,
   configs/pythia-160m.yaml; sequence 128, micro-batch 1 so a CPU step takes about a second). Synchronous: the
   whole save (slices, state, tokenizer-sized files, fsyncs, CRC32 manifest, rename) blocks the loop.
   Asynchronous (checkpoint.async, megapile/checkpoint/background.py): the snapshot (what to copy, and the
   RNG and state) and the commit block it; the copy into host buffers and the write run on a background thread
   while training steps go on (the next optimizer step waits for the copy), timed against the same steps with no
   write in flight. The same background write from a persistent writer process (the buffers in
   shared memory) is measured beside the thread, the choice megapile/checkpoint/background.py explains.
   Then the disk: raw sequential write (fsync) and read speed against the save and the two loads (same layout, and
   the slices as any layout reads them).
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
import statistics
import subprocess
import sys
import time
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from megapile import checkpoint  # noqa: E402
from megapile.checkpoint import background, collective, fragments, manifest, portable, slices  # noqa: E402
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


SHAPES = {  # name: (config, overrides): CPU-sized steps of the presets' parameter counts
    "tiny": ("configs/tiny.yaml", ["model.vocab_size=1024"]),
    "160m": ("configs/pythia-160m.yaml", []),
}
SEQ = 128


def _engine(config: Optional[str], overrides: list[str], stage: int, world: int, keep: int = 4):
    cfg = load_config(config, overrides + ["train.micro_batch_size=1", f"train.global_batch_size={world}",
                                           f"train.seq_len={SEQ}", f"checkpoint.keep_last={keep}"])
    model = build_model(cfg.model, seed=0)
    ds = resolve_ds_config({"zero_optimization": {"stage": stage, "overlap_comm": False}}, cfg, world, "fp32",
                           "bench")
    layout = Layout(world, 1, 1, world)
    return cfg, layout, parallelize(cfg, layout, model, ds).engine


def _step(engine, vocab: int) -> float:
    """One training step (Adam's moments exist after the first); its seconds."""
    start = time.perf_counter()
    x = torch.randint(0, vocab, (1, SEQ), generator=torch.Generator().manual_seed(0))
    engine.backward(engine(x, targets=x))
    engine.step()
    return time.perf_counter() - start


def _state(cfg, layout, engine, step: int) -> dict:
    return {"step": step, "sample_index": 0, "tokens_seen": 0, "world_size": layout.world,
            "zero_stage": engine.zero_optimization_stage(), "config": cfg.to_dict()}


def _slices(cfg, layout, rank: int = 0) -> collective.Slices:
    return collective.Slices(layout, rank, cfg.model.num_layers, cfg.model.family.tensor_plan)


def _save(engine, cfg, layout, directory: str, step: int, rank: int) -> None:
    collective.save(engine, directory, step, _state(cfg, layout, engine, step), cfg.checkpoint, rank == 0,
                    _slices(cfg, layout, rank))


def _process_writer(inbox, outbox) -> None:
    """A persistent writer process: each staged save in, its write's result out."""
    while (staged := inbox.get()) is not None:
        outbox.put(collective.write(staged))


class _WriterProcess:
    """background.Background's thread replaced by a persistent process; the buffers go to shared memory on the
    first save and are passed as handles after."""

    def __init__(self) -> None:
        ctx = torch.multiprocessing.get_context("spawn")
        self.inbox, self.outbox = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=_process_writer, args=(self.inbox, self.outbox), daemon=True)
        self.proc.start()
        self.result = None

    def start(self, staged) -> None:
        for _, tensors in staged.files:
            for t in tensors.values():
                t.share_memory_()  # once: a buffer already shared stays so
        self.result = None
        self.inbox.put(staged)

    def done(self) -> bool:
        if self.result is None and not self.outbox.empty():
            self.result = self.outbox.get()
        return self.result is not None

    def close(self) -> None:
        self.inbox.put(None)
        self.proc.join()


def blocked_per_save(name: str, args, directory: str) -> dict:
    """Seconds the loop is blocked per save, synchronous and asynchronous (thread, process), and step times."""
    config, overrides = SHAPES[name]
    cfg, layout, engine = _engine(os.path.join(ROOT, config), overrides, 1, 1, keep=2)
    vocab = cfg.model.vocab_size
    for _ in range(2):
        _step(engine, vocab)
    alone = [_step(engine, vocab) for _ in range(args.steps)]
    shutil.rmtree(directory, ignore_errors=True)
    out = {"params": sum(p.numel() for p in engine.module.parameters()), "step": statistics.median(alone),
           "sync": [], "snapshot": [], "commit": [], "during": [], "writes": [], "process_blocked": [],
           "process_during": []}
    step = 0
    for _ in range(args.repeats):
        step += 1
        t = time.perf_counter()
        _save(engine, cfg, layout, directory, step, 0)
        out["sync"].append(time.perf_counter() - t)
    saver = background.Background(1, engine.optimizer)  # the slices copied while the next steps run
    for _ in range(args.repeats):
        step += 1
        t = time.perf_counter()
        staged = collective.stage(engine, directory, step, _state(cfg, layout, engine, step), True,
                                  _slices(cfg, layout), buffers=saver.buffers)
        saver.start(staged, step, 0.0)
        out["snapshot"].append(time.perf_counter() - t)
        while saver.in_flight and not saver.ready():
            out["during"].append(_step(engine, vocab))
        out["writes"].append(time.perf_counter() - t)
        t = time.perf_counter()
        collective.commit(*saver.take(), cfg.checkpoint, True, prune_now=False)
        saver.prune(directory, cfg.checkpoint)  # as megapile/checkpoint/manager.py: on a thread
        out["commit"].append(time.perf_counter() - t)
    writer = _WriterProcess()
    for _ in range(args.repeats):
        step += 1
        t = time.perf_counter()
        staged = collective.stage(engine, directory, step, _state(cfg, layout, engine, step), True,
                                  _slices(cfg, layout), buffers=saver.buffers)
        saver.buffers.fill()  # the process writes the buffers: copied here, on the training thread (blocked)
        writer.start(staged)
        blocked = time.perf_counter() - t
        while not writer.done():
            out["process_during"].append(_step(engine, vocab))
        t = time.perf_counter()
        saver.join_pruner()
        collective.commit(staged, writer.result, cfg.checkpoint, True)
        out["process_blocked"].append(blocked + time.perf_counter() - t)
    writer.close()
    out["mb"] = manifest.total_bytes(os.path.join(directory, f"global_step{step}")) / 1e6
    engine.destroy()
    return out


def blocking(args) -> None:
    rows = {name: blocked_per_save(name, args, os.path.join(args.dir, name)) for name in args.shapes.split(",")}
    print(f"blocked per save, 1 rank, ZeRO-1 fp32, seq {SEQ} micro 1; best of {args.repeats} saves, median step")
    print(f"{'shape':>6} {'params':>7} {'ckpt MB':>8} {'step s':>7} {'sync s':>7} {'async s':>8} {'/ sync':>7} "
          f"{'/ step':>7} {'snapshot':>8} {'commit':>7} {'write s':>8} {'steps in it':>11} {'slowdown':>9} "
          f"{'process s':>9} {'slowdown':>9}")
    for name, r in rows.items():
        sync = min(r["sync"])
        best = min(range(len(r["snapshot"])), key=lambda i: r["snapshot"][i] + r["commit"][i])
        blocked = r["snapshot"][best] + r["commit"][best]
        slow = statistics.median(r["during"]) / r["step"] if r["during"] else float("nan")
        slow_p = statistics.median(r["process_during"]) / r["step"] if r["process_during"] else float("nan")
        print(f"{name:>6} {r['params'] / 1e6:6.1f}M {r['mb']:8.1f} {r['step']:7.3f} {sync:7.3f} {blocked:8.3f} "
              f"{blocked / sync:7.1%} {blocked / r['step']:7.2f} {r['snapshot'][best]:8.3f} {r['commit'][best]:7.3f} "
              f"{min(r['writes']):8.2f} {len(r['during']):11d} "
              f"{slow:8.2f}x {min(r['process_blocked']):9.3f} {slow_p:8.2f}x")
    print("async s: snapshot + commit (the loop's whole cost); write s: snapshot to every rank's write done; "
          "slowdown: median step time while the write is in flight / without (thread; then the process writer)")


def throughput(args) -> None:
    cfg, layout, engine = _engine(None, [f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}",
                                         "model.num_heads=8", f"model.vocab_size={args.vocab}"], 1, 1,
                                  keep=args.repeats + 1)
    _step(engine, args.vocab)
    shutil.rmtree(args.dir, ignore_errors=True)
    saves, loads, slice_loads = [], [], []
    for step in range(1, args.repeats + 1):
        t = time.perf_counter()
        _save(engine, cfg, layout, args.dir, step, 0)
        saves.append(time.perf_counter() - t)
        t = time.perf_counter()
        found = checkpoint.find_resumable(args.dir)
        collective.load(engine, found, _slices(cfg, layout))
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
    print(f"\nmodel {n_params / 1e6:.1f}M params, ZeRO-1, 1 rank, checkpoint {mb:.1f} MB in {args.dir} "
          f"({slice_bytes / 1e6:.1f} MB of it the layout-free slices; best of {args.repeats})")
    print(f"raw sequential write {mb / raw_w:.0f} MB/s (with fsync), raw read {mb / raw_r:.0f} MB/s (page cache)")
    print(f"{'':28}{'MB/s':>8}{'/ raw write':>12}{'/ raw read':>12}")
    print(f"{'save (synchronous)':28}{mb / save_s:8.0f}{raw_w / save_s:12.2f}{'':>12}")
    print(f"{'load, same layout':28}{mb / load_s:8.0f}{raw_w / load_s:12.2f}{raw_r / load_s:12.2f}")
    slice_mb = slice_bytes / 1e6
    print(f"{'load, slices (any layout)':28}{slice_mb / slice_s:8.0f}{(raw_w * slice_mb / mb) / slice_s:12.2f}"
          f"{(raw_r * slice_mb / mb) / slice_s:12.2f}")
    engine.destroy()


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
    model = [f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}", "model.num_heads=8",
             f"model.vocab_size={args.vocab}"]
    cfg, layout, engine = _engine(None, model, 1, env.world_size)
    _step(engine, args.vocab)
    directory = os.path.join(args.dir, "reshard")
    _save(engine, cfg, layout, directory, 1, env.rank)
    engine.destroy()
    del engine
    cfg, layout, engine = _engine(None, model, 3, env.world_size)
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
    parser.add_argument("--shapes", default="tiny,160m", help="for the blocked-per-save table: " + ", ".join(SHAPES))
    parser.add_argument("--steps", type=int, default=5, help="steps timed without a write in flight")
    parser.add_argument("--reshard-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reshard_worker:
        reshard_memory(args)
        return
    distributed.init(distributed.detect({}), backend="gloo")
    blocking(args)
    throughput(args)
    distributed.shutdown()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29631",
           os.path.abspath(__file__), "--reshard-worker"] + sys.argv[1:]
    subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))


if __name__ == "__main__":
    main()
