"""Per-rank memory of each parallel layout on 2 CPU ranks (gloo, fp32), side by side.

    python bench/parallel_memory.py                       # ~120M parameters (~470 MB of fp32 weights)
    python bench/parallel_memory.py --layers 4 --hidden 512   # quicker

For each layout — plain data parallel (ZeRO-0), ZeRO-1, ZeRO-2, ZeRO-3, tensor parallel 2 (ZeRO-1) and
pipeline parallel 2 (ZeRO-1) — the engine is built exactly as `megapile/train.py` builds it (same wrappers),
two optimizer steps run on a global batch of 2 sequences, and every rank reports:

    params MB   bytes of the parameters this rank holds (ZeRO-3: its partition)
    optim MB    fp32 master partitions + Adam moments this rank holds
    model MB    the resident memory building the model added at its peak, and the same as a fraction of the whole
                model's fp32 weights: ZeRO-3 built whole on every rank (as megapile did before zero.Init) against
                ZeRO-3 partitioned as it is built (about 1/ranks, plus one module while it is constructed)
    build MB    the same for the model and the engine together (DeepSpeed's fp32 partitions, gradient buffers),
                before any step
    peak RSS    the process's high-water resident memory (VmHWM): everything, incl. the build and activations

The table shows the largest rank, the ratio of its parameter memory to plain data parallel, and DeepSpeed's
own model-state estimate where DeepSpeed has one (ZeRO-2/3 `estimate_zero*_model_states_mem_needs`, which
assume bf16/fp16 weights with fp32 master copies on GPUs, so they are lower than fp32 CPU figures).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LAYOUTS = [  # name, ZeRO stage, tensor, pipeline, built as megapile/train.py builds it
    ("DP (ZeRO-0)", 0, 1, 1, True),
    ("ZeRO-1", 1, 1, 1, True),
    ("ZeRO-2", 2, 1, 1, True),
    ("ZeRO-3 whole", 3, 1, 1, False),  # the whole model built on every rank, then partitioned (before zero.Init)
    ("ZeRO-3", 3, 1, 1, True),  # partitioned as it is built (megapile/parallel/zero_init.py)
    ("TP2 (ZeRO-1)", 1, 2, 1, True),
    ("PP2 (ZeRO-1)", 1, 1, 2, True),
]
RANKS = 2


def _config(args, stage: int, tensor: int, pipeline: int):
    from megapile.config import Config, ModelConfig, OptimConfig, ParallelConfig, TrainConfig

    cfg = Config()
    cfg.model = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_heads=args.heads,
                            vocab_size=args.vocab, max_seq_len=args.seq)
    cfg.train = TrainConfig(max_steps=10, seq_len=args.seq, micro_batch_size=1, global_batch_size=RANKS, dtype="fp32")
    cfg.optim = OptimConfig(lr=1e-4)
    cfg.parallel = ParallelConfig(tensor=tensor, pipeline=pipeline)
    return cfg


def worker(args) -> None:
    import torch

    from megapile.model import GPT, build_model
    from megapile.parallel.ds_config import resolve_ds_config
    from megapile.parallel.layout import resolve_layout
    from megapile.parallel.parallelize import parallelize
    from megapile.parallel.zero_init import build_partitioned
    from megapile.runtime import distributed

    stage, tensor, pipeline = args.worker
    cfg = _config(args, stage, tensor, pipeline)
    env = distributed.detect(os.environ)
    distributed.init(env, backend="gloo")
    cfg.parallel.zero_stage = stage
    layout = resolve_layout(cfg, env.world_size)
    ds = resolve_ds_config({"zero_optimization": {"stage": stage}}, cfg, layout.data, "fp32", "bench")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the high-water mark restarts at the current resident size
    before = _vm_rss_mb()
    if pipeline > 1:
        with torch.device("meta"):
            model = GPT(cfg.model)
    elif stage == 3 and args.partitioned:
        model = build_partitioned(cfg.model, 0, ds, torch.device("cpu"))
    else:
        model = build_model(cfg.model, seed=0)
    model_mb = _vm_hwm_mb() - before
    engine = parallelize(cfg, layout, model, ds).engine
    del model
    build_mb = _vm_hwm_mb() - before
    gen = torch.Generator().manual_seed(layout.data_rank(env.rank))
    accum = cfg.train.global_batch_size // (cfg.train.micro_batch_size * layout.data)
    for _ in range(2):
        batches = [(x, x) for x in (torch.randint(0, args.vocab, (1, args.seq), generator=gen) for _ in range(accum))]
        if pipeline > 1:
            engine.train_batch(iter(batches))
        else:
            for x, y in batches:
                engine.backward(engine(x, targets=y))
                engine.step()
    params = sum(getattr(p, "ds_tensor", p).numel() * 4 for p in engine.module.parameters())
    report = {"rank": env.rank, "params_mb": params / 1e6, "build_mb": build_mb, "model_mb": model_mb, "optim_mb": _optimizer_bytes(engine) / 1e6,
              "peak_rss_mb": _vm_hwm_mb(), "total_params": _total_params(cfg)}
    with open(os.path.join(args.out, f"rank{env.rank}.json"), "w") as f:  # stdout lines of ranks interleave
        json.dump(report, f)
    engine.destroy()
    distributed.shutdown()


def _optimizer_bytes(engine) -> int:
    """fp32 master partitions and Adam moments held by this rank (each storage counted once)."""
    import torch

    opt = engine.optimizer
    tensors = []
    base = getattr(opt, "optimizer", opt)
    for state in base.state.values():
        tensors += [t for t in state.values() if torch.is_tensor(t)]
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        tensors += list(getattr(opt, attr, []) or [])
    seen, total = set(), 0
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen and t.numel() > 1:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _total_params(cfg) -> int:
    import torch

    from megapile.model import GPT

    with torch.device("meta"):
        return GPT(cfg.model).num_params(exclude_embedding=False)


def _vm_hwm_mb() -> float:
    return _status_mb("VmHWM")


def _vm_rss_mb() -> float:
    return _status_mb("VmRSS")


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field + ":")).split()[1]) / 1024


def _largest_layer_params(cfg) -> int:
    import torch

    from megapile.model import GPT

    with torch.device("meta"):
        model = GPT(cfg.model)
    return max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())


def _ds_estimate_mb(stage: int, tensor: int, pipeline: int, cfg, total: int) -> str:
    if tensor > 1 or pipeline > 1 or stage not in (2, 3):
        return "—"
    if stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        _, gpu = estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=RANKS, cpu_offload=False)
    else:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        _, gpu, _ = estimate_zero3_model_states_mem_needs(total, _largest_layer_params(cfg), num_gpus_per_node=RANKS,
                                                          cpu_offload=False, cpu_offload_params=False)
    return f"{gpu / 1e6:.0f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--worker", type=int, nargs=3, metavar=("STAGE", "TENSOR", "PIPELINE"), help=argparse.SUPPRESS)
    parser.add_argument("--partitioned", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    import deepspeed  # noqa: F401  (its accelerator notice prints here, not inside the table)

    shape = ["--layers", str(args.layers), "--hidden", str(args.hidden), "--heads", str(args.heads),
             "--vocab", str(args.vocab), "--seq", str(args.seq)]
    rows = []
    for name, stage, tensor, pipeline, partitioned in LAYOUTS:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = tempfile.mkdtemp(prefix="megapile-memory-")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(RANKS),
               "--master_port", str(port),
               os.path.abspath(__file__), *shape, "--worker", str(stage), str(tensor), str(pipeline), "--out", out]
        cmd += ["--partitioned"] if partitioned else []
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        reports = []
        for name_ in sorted(os.listdir(out)):
            with open(os.path.join(out, name_)) as f:
                reports.append(json.load(f))
        shutil.rmtree(out, ignore_errors=True)
        if proc.returncode != 0 or len(reports) != RANKS:
            print(f"{name}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
            return 1
        rows.append((name, stage, tensor, pipeline, reports))
    total = rows[0][4][0]["total_params"]
    cfg = _config(args, 0, 1, 1)
    print(f"model: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}: {total / 1e6:.1f}M parameters, "
          f"{total * 4 / 1e6:.0f} MB in fp32; {RANKS} CPU ranks, global batch {RANKS} × {args.seq} tokens")
    print(f"{'layout':<14} {'params MB':>10} {'vs DP':>6} {'optim MB':>9} {'model MB':>9} {'/ model':>8} "
          f"{'build MB':>9} {'peak RSS MB':>12} {'DS estimate MB':>15}")
    dp_params = max(r["params_mb"] for r in rows[0][4])
    for name, stage, tensor, pipeline, reports in rows:
        params = max(r["params_mb"] for r in reports)
        optim = max(r["optim_mb"] for r in reports)
        rss = max(r["peak_rss_mb"] for r in reports)
        build, built = max(r["build_mb"] for r in reports), max(r["model_mb"] for r in reports)
        print(f"{name:<14} {params:>10.0f} {params / dp_params:>6.2f} {optim:>9.0f} {built:>9.0f} "
              f"{built / (total * 4 / 1e6):>8.2f} {build:>9.0f} {rss:>12.0f} "
              f"{_ds_estimate_mb(stage, tensor, pipeline, cfg, total):>15}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
