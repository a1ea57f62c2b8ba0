"""What loss-spike detection (train.spike) costs per training step, as a fraction of the step, in one run.

    python bench/spikes.py [--preset tiny|pythia-14m] [--steps 20]

Per step the detector adds: the judge (z-score of the step's loss against a full window of 128 steps, in Python
floats), the bookkeeping after the step (the gradient norm's z-score, the window update), and one all-reduce of
one scalar (the step's mean loss before the update), measured here on 2 gloo ranks of this machine; the
gradient norm rides along in the all-reduce every step already makes (the stop and non-finite flags). The step is a plain PyTorch training step of the same model (forward, backward, fused AdamW) on
one process, which is cheaper than megapile's DeepSpeed step, so the printed fraction is an upper bound.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from megapile.config import ModelConfig, SpikeConfig  # noqa: E402
from megapile.model import build_model, param_groups  # noqa: E402
from megapile.training.spikes import SpikeDetector  # noqa: E402

PRESETS = {"tiny": dict(num_layers=2, hidden_size=64, num_heads=4, vocab_size=512, batch=8, seq=128),
           "pythia-14m": dict(num_layers=6, hidden_size=128, num_heads=4, vocab_size=50304, batch=8, seq=256)}


def step_seconds(preset: dict, steps: int) -> float:
    """Median seconds of one training step of the preset's model."""
    shape = {k: v for k, v in preset.items() if k not in ("batch", "seq")}
    model = build_model(ModelConfig(max_seq_len=preset["seq"], **shape), seed=0)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, fused=True)
    x = torch.randint(0, shape["vocab_size"], (preset["batch"], preset["seq"] + 1))
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        loss = model(x[:, :-1], targets=x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def detector_seconds(calls: int = 20000) -> float:
    """Seconds per step of the detector's own work with a full window (judge + observe, no collectives)."""
    detector = SpikeDetector(SpikeConfig(enabled=True))
    for i in range(detector.cfg.window):
        detector.observe(i, (0, 8), detector.judge(3.0 + 0.01 * (i % 7)), 1.0 + 0.01 * (i % 5))
    start = time.perf_counter()
    for i in range(calls):
        verdict = detector.judge(3.0 + 0.01 * (i % 7))
        detector.observe(i, (0, 8), verdict, 1.0 + 0.01 * (i % 5))
    return (time.perf_counter() - start) / calls


def _allreduce_worker(rank: int, port: int, calls: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    value = torch.ones((), dtype=torch.float64)
    for _ in range(50):
        dist.all_reduce(value)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(calls):
        dist.all_reduce(value)
    if rank == 0:
        out.put((time.perf_counter() - start) / calls)
    dist.destroy_process_group()


def allreduce_seconds(calls: int = 2000) -> float:
    """Seconds per all-reduce of one scalar between 2 gloo ranks on this machine."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = 29000 + os.getpid() % 1000
    procs = [ctx.Process(target=_allreduce_worker, args=(r, port, calls, out)) for r in range(2)]
    for p in procs:
        p.start()
    seconds = out.get(timeout=300)
    for p in procs:
        p.join()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as each rank of a training run (OMP_NUM_THREADS=1)
    step = step_seconds(PRESETS[args.preset], args.steps)
    own = detector_seconds()
    reduce = allreduce_seconds()
    added = own + reduce
    print(f"preset {args.preset}: training step {step * 1e3:.1f} ms (median of {args.steps}, 1 thread)")
    print(f"detector work {own * 1e6:.1f} µs + 1 all-reduce of a scalar on 2 gloo ranks {reduce * 1e6:.1f} µs "
          f"= {added * 1e6:.1f} µs per step")
    print(f"detector / step = {added / step:.2%} (goal <= 1%)")


if __name__ == "__main__":
    main()
