"""Peak training memory per option, side by side with the default, each option in a fresh process.

    python bench/memory.py                                    # pythia-14m shape, batch 4 x seq 512, CPU
    python bench/memory.py --preset tiny --batch 16
    python bench/memory.py --device cuda --dtype bf16 --zero  # on a GPU, with ZeRO-2 and its CPU offload

Every option trains the same model on the same random batch for `--steps` steps (forward, backward,
AdamW step) in its own subprocess, so no allocator state carries over. On CPU the figure is the
process's peak resident memory (`getrusage(RUSAGE_SELF).ru_maxrss`) minus the peak right after the
model and optimizer were built: activations, logits, gradients and optimizer state. On a GPU it is
`torch.cuda.max_memory_allocated` after the same point, minus the memory allocated there.

Options (`model.*` switches of megapile/config.py; the default row is megapile's defaults):

    default            chunked loss, no activation checkpointing
    plain_loss         model.chunked_loss=false: F.linear + F.cross_entropy, full fp32 logits
    checkpoint_all     model.activation_checkpointing=true (every block recomputed in backward)
    checkpoint_every2  ... with model.checkpoint_every=2 (every second block)
    zero2              (--zero) DeepSpeed ZeRO-2 engine, one rank
    zero2_offload      (--zero) ZeRO-2 with offload_optimizer to CPU: Adam state and fp32 master weights
                       leave the device (on CPU there is nothing to move them to, so --zero is for GPUs)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train_throughput import PRESETS  # noqa: E402

from megapile.config import ModelConfig  # noqa: E402

OPTIONS = {
    "default": {},
    "plain_loss": {"chunked_loss": False},
    "checkpoint_all": {"activation_checkpointing": True},
    "checkpoint_every2": {"activation_checkpointing": True, "checkpoint_every": 2},
}
ZERO_OPTIONS = {"zero2": {}, "zero2_offload": {}}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def worker(args) -> dict:
    """Train `args.worker` for a few steps; return its peak memory above the post-build baseline."""
    from megapile.model import build_model, param_groups

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shape, batch, seq_len = PRESETS[args.preset]
    batch, seq_len = args.batch or batch, args.seq_len or seq_len
    cfg = ModelConfig(arch="neox", **{**shape, "max_seq_len": max(shape["max_seq_len"], seq_len)},
                      **OPTIONS.get(args.worker, {}))
    model = build_model(cfg, seed=0, device=device).train()
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, fused=True)
    dtype = DTYPES[args.dtype]
    if args.worker in ZERO_OPTIONS:
        step = _zero_step(args, model, opt, batch)
    else:
        def step(x, y):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = model(x, targets=y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=torch.Generator().manual_seed(0))
    x, y = tokens[:, :-1].to(device), tokens[:, 1:].to(device)
    baseline = _peak(device, reset=True)
    start = time.perf_counter()
    losses = [float(step(x, y)) for _ in range(args.steps)]
    seconds = (time.perf_counter() - start) / args.steps
    return {"option": args.worker, "peak_mb": (_peak(device) - baseline) / 2**20, "baseline_mb": baseline / 2**20,
            "loss": losses[-1], "step_s": seconds}


def _zero_step(args, model, opt, batch: int):
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(args.port)).items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", "/root/.cache/megapile-ext")
    import deepspeed

    zero = {"stage": 2}
    if args.worker == "zero2_offload":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        opt = DeepSpeedCPUAdam(opt.param_groups, lr=1e-4, adamw_mode=True)
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": args.device == "cuda"}
    config = {"train_micro_batch_size_per_gpu": batch, "gradient_clipping": 1.0, "zero_optimization": zero,
              "bf16": {"enabled": args.dtype == "bf16"}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)

    def step(x, y):
        loss = engine(x, targets=y)
        engine.backward(loss)
        engine.step()
        return loss

    return step


def _peak(device: torch.device, reset: bool = False) -> int:
    """Bytes: the CUDA allocator's peak, or this process's peak resident set (ru_maxrss is KiB on Linux)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
            return torch.cuda.memory_allocated(device)
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="pythia-14m")
    p.add_argument("--batch", type=int, help="micro-batch size (default: the preset's)")
    p.add_argument("--seq-len", type=int, help="sequence length (default: the preset's)")
    p.add_argument("--steps", type=int, default=2, help="training steps per option")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="autocast dtype (ZeRO rows: bf16 engine)")
    p.add_argument("--zero", action="store_true", help="add the ZeRO-2 and ZeRO-2 + CPU offload rows")
    p.add_argument("--options", nargs="*", help="run only these options")
    p.add_argument("--port", type=int, default=29561, help=argparse.SUPPRESS)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return 0

    names = list(OPTIONS) + (list(ZERO_OPTIONS) if args.zero else [])
    names = [n for n in names if not args.options or n in args.options]
    load_before = f"{os.getloadavg()[0]:.2f}"
    passed = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--zero"]
    rows = {}
    for name in names:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", name] + passed,
                              capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode or not lines:
            print(f"  {name}: failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
            continue
        rows[name] = json.loads(lines[-1])
    shape, batch, seq_len = PRESETS[args.preset]
    batch, seq_len = args.batch or batch, args.seq_len or seq_len
    what = "CUDA max_memory_allocated" if args.device == "cuda" else "peak RSS (ru_maxrss)"
    print(f"preset {args.preset}: {shape['num_layers']} layers, hidden {shape['hidden_size']}, vocab "
          f"{shape['vocab_size']}, batch {batch} x seq {seq_len}, {args.dtype} on {args.device}, {args.steps} steps; "
          f"{what} above the post-build baseline, torch {torch.__version__}")
    ref = rows.get("default")
    for name, r in rows.items():
        ratio = f"{r['peak_mb'] / ref['peak_mb']:.2f}x default" if ref and ref["peak_mb"] > 0 else ""
        print(f"  {name:<18} {r['peak_mb']:>9.1f} MB  {ratio:<14} (baseline {r['baseline_mb']:.0f} MB, "
              f"step {r['step_s']:.2f} s, loss {r['loss']:.3f})")
    pairs = [("chunked loss", "default", "plain_loss"), ("checkpointing, every block", "checkpoint_all", "default"),
             ("checkpointing, every 2nd block", "checkpoint_every2", "default"),
             ("ZeRO-2 optimizer offload", "zero2_offload", "zero2")]
    for label, with_, without in pairs:
        if with_ in rows and without in rows:
            a, b = rows[with_]["peak_mb"], rows[without]["peak_mb"]
            change = f"saves {b - a:.1f} MB" if b >= a else f"costs {a - b:.1f} MB more"
            print(f"  {label}: {a:.1f} MB with vs {b:.1f} MB without: {change} "
                  f"({a / b:.2f}x); step time {rows[with_]['step_s'] / rows[without]['step_s']:.2f}x")
    print(f"  load average before/after: {load_before} / {os.getloadavg()[0]:.2f}")
    return 0 if len(rows) == len(names) else 1


if __name__ == "__main__":
    raise SystemExit(main())
