"""Training throughput: megapile's step against transformers' GPTNeoXForCausalLM (LlamaForCausalLM for the llama
presets) + AdamW.

Both run the identical shape on the same random batch with the same thread count, in one
process, with their steps interleaved (ours, theirs, ours, ...) so machine noise hits both
alike. Prints tokens/s of each, the ratio, and MFU of each against a matmul peak measured in
the same run (the best of several windows before and after the steps).

    python bench/train_throughput.py --preset tiny --threads 2
    python bench/train_throughput.py --preset pythia-14m --threads 2 --steps 4
    python bench/train_throughput.py --preset llama-tiny --threads 2   # against LlamaForCausalLM
    python bench/train_throughput.py --preset tiny --deepspeed      # ours inside a ZeRO-0 engine
    python bench/train_throughput.py --preset tiny --scaling        # DeepSpeed ZeRO-1: 2 ranks vs 1 rank
    python bench/train_throughput.py --preset pythia-1b --device cuda --dtype bf16   # on a GPU (bench/gpu.sh)

"Our step" is megapile's: GPT (model.py) + torch AdamW over param_groups (no decay on biases
and norms) + global grad-norm clipping; with --deepspeed, the same model and optimizer wrapped by
deepspeed.initialize on one rank. "Their step" is the plain transformers loop: model(input_ids,
labels=...) -> loss.backward() -> clip -> torch.optim.AdamW.step(), with transformers' default
attention (sdpa) unless --hf-attn says otherwise. Both use the same AdamW implementation
(--adam, default fused as the transformers Trainer does), so the ratio measures the models.
--dtype bf16 runs both under torch.autocast (weights and AdamW in fp32). --scaling runs our model
in DeepSpeed ZeRO-1 (--zero) with 1 and then 2 ranks over gloo, one thread per rank, the same
micro-batch per rank, and prints the tokens/s ratio.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megapile.config import ModelConfig  # noqa: E402

PRESETS = {
    # name: (model shape, micro-batch, seq_len)
    "tiny": (dict(num_layers=2, hidden_size=128, num_heads=4, vocab_size=8192, max_seq_len=128), 8, 128),
    "pythia-14m": (dict(num_layers=6, hidden_size=128, num_heads=4, vocab_size=50304, max_seq_len=2048), 4, 512),
    # GPU shapes (bench/gpu.sh): the published Pythia models at their training sequence length
    "pythia-160m": (dict(num_layers=12, hidden_size=768, num_heads=12, vocab_size=50304, max_seq_len=2048), 8, 2048),
    "pythia-1b": (dict(num_layers=16, hidden_size=2048, num_heads=8, vocab_size=50304, max_seq_len=2048), 8, 2048),
    # configs/llama-tiny.yaml's shape (GQA 4 query / 2 key-value heads, SwiGLU) with the tiny preset's vocabulary
    "llama-tiny": (dict(arch="llama", num_layers=2, hidden_size=128, num_heads=4, num_kv_heads=2,
                        intermediate_size=352, vocab_size=8192, max_seq_len=128), 8, 128),
    # GPU shape: Llama-3.2-1B (configs/llama-1b.yaml without rope scaling) at 2048 tokens
    "llama-1b": (dict(arch="llama", num_layers=16, hidden_size=2048, num_heads=32, num_kv_heads=8,
                      intermediate_size=8192, vocab_size=128256, max_seq_len=2048, rotary_base=500000.0,
                      tie_embeddings=True), 8, 2048),
}
LR, WEIGHT_DECAY, BETAS, CLIP = 1e-3, 0.1, (0.9, 0.95), 1.0
# torch.optim.AdamW implementations; both sides always use the same one. "fused" is what the
# transformers Trainer uses by default with torch >= 2.8; "plain" is torch's default on CPU (a
# per-tensor loop, ~10x slower than fused on CPU).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ADAM_IMPL = {"fused": {"fused": True}, "foreach": {"foreach": True}, "plain": {"foreach": False}}


def _amp(device: torch.device, dtype: torch.dtype):
    """bf16 autocast for both sides on request (weights and AdamW stay fp32, as mixed precision does)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def ours_step_fn(cfg: ModelConfig, seed: int, compile_model: bool, deepspeed_engine: bool, batch: int, adam: str,
                 device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32):
    from megapile.model import build_model, param_groups

    model = build_model(cfg, seed=seed, device=device).train()
    opt = torch.optim.AdamW(param_groups(model, WEIGHT_DECAY), lr=LR, betas=BETAS, **ADAM_IMPL[adam])
    if deepspeed_engine:
        engine = _deepspeed_engine(model, opt, batch)

        def step(x, y):
            loss = engine(x, targets=y)
            engine.backward(loss)
            engine.step()
            return loss.detach()

        return model, step
    if compile_model:  # model.compile: each block compiled, as train.py does
        from megapile.model import compile_blocks

        compile_blocks(model)
    fwd = model

    return model, _optimizer_step(lambda x, y: fwd(x, targets=y), model, opt, device, dtype)


def hf_step_fn(cfg: ModelConfig, attn: str, adam: str, device: torch.device = torch.device("cpu"),
               dtype: torch.dtype = torch.float32):
    import transformers

    from megapile.hf.convert import HF_CLASS, config_to_hf

    hf_cfg = config_to_hf(cfg)
    torch.manual_seed(0)
    cls = getattr(transformers, HF_CLASS[cfg.arch])  # the same architecture as ours
    model = cls._from_config(hf_cfg, attn_implementation=attn).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, **ADAM_IMPL[adam])

    # HF shifts labels itself; passing the inputs as labels trains on the same next tokens.
    return model, _optimizer_step(lambda x, y: model(input_ids=x, labels=x).loss, model, opt, device, dtype)


def _optimizer_step(loss_fn, model, opt, device: torch.device, dtype: torch.dtype):
    """The one training step both sides run: forward (autocast below fp32), backward, clip, AdamW."""

    def step(x, y):
        with _amp(device, dtype):
            loss = loss_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def _deepspeed_engine(model, opt, batch: int):
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT="29555").items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", "/root/.cache/megapile-ext")
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": batch, "gradient_clipping": CLIP,
              "zero_optimization": {"stage": 0}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    return engine


def matmul_peak_tflops(n: int = 2048, seconds: float = 1.0, windows: int = 4, device: torch.device = torch.device("cpu"),
                       dtype: torch.dtype = torch.float32) -> float:
    """The best of a few short windows of n^2 matmuls: the least disturbed by other processes,
    so MFU errs low rather than high."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    best = 0.0
    for _ in range(windows):
        _sync(device)
        iters, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / windows:
            torch.mm(a, b)
            iters += 1
        _sync(device)
        best = max(best, 2 * n**3 * iters / (time.perf_counter() - start) / 1e12)
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- 1 rank vs 2 ranks


def scaling_worker(args, cfg: ModelConfig, batch: int, seq_len: int) -> None:
    """One rank of a DeepSpeed ZeRO run on random tokens; rank 0 prints its timings as one JSON line."""
    import json

    import torch.distributed as dist

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", "/root/.cache/megapile-ext")
    import deepspeed

    from megapile.model import build_model, param_groups

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model(cfg, seed=0).train()
    opt = torch.optim.AdamW(param_groups(model, WEIGHT_DECAY), lr=LR, betas=BETAS, **ADAM_IMPL[args.adam])
    config = {"train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1,
              "train_batch_size": batch * world, "gradient_clipping": CLIP,
              "zero_optimization": {"stage": args.zero}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    gen = torch.Generator().manual_seed(rank)  # each rank its own share of the global batch
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=gen)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    peak = matmul_peak_tflops(seconds=0.6)
    times = []
    for i in range(args.warmup + args.steps):
        dist.barrier()
        start = time.perf_counter()
        loss = engine(x, targets=y)
        engine.backward(loss)
        engine.step()
        float(loss)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    peaks = torch.tensor([peak])
    dist.all_reduce(peaks)  # the mean per-rank peak
    if rank == 0:
        print(json.dumps({"world": world, "times": times, "peak_per_rank": float(peaks) / world,
                          "threads": torch.get_num_threads()}), flush=True)
    engine.destroy()
    dist.destroy_process_group()


def run_scaling(args, argv: list[str], cfg: ModelConfig, batch: int, seq_len: int) -> int:
    """DeepSpeed ZeRO-`--zero` with 1 rank then 2 ranks, each rank one thread (OMP_NUM_THREADS=1), the same
    micro-batch per rank: tokens/s of both and the ratio. Rounds alternate 1, 2, 1, 2, ... against drift."""
    import json
    import socket
    import subprocess

    load_before = f"{os.getloadavg()[0]:.2f}"
    results: dict[int, list[dict]] = {1: [], 2: []}
    for _ in range(args.rounds):
        for world in (1, 2):
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            procs = []
            for rank in range(world):
                env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                           LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                           OMP_NUM_THREADS="1")
                cmd = [sys.executable, os.path.abspath(__file__), "--scaling-worker"] + argv + ["--threads", "1"]
                procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
            outs = [p.communicate(timeout=1200) for p in procs]
            if any(p.returncode for p in procs):
                for p, (out, err) in zip(procs, outs):
                    print(f"rank exited {p.returncode}:\n{out[-2000:]}\n{err[-4000:]}", file=sys.stderr)
                return 1
            line = [ln for ln in outs[0][0].splitlines() if ln.startswith("{")][-1]
            results[world].append(json.loads(line))

    flops_per_token = _flops_per_token(cfg, seq_len)
    print(f"preset {args.preset}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}, "
          f"micro-batch {batch} x seq {seq_len} per rank, 1 thread per rank, DeepSpeed ZeRO-{args.zero} (gloo), "
          f"AdamW {args.adam}, {args.rounds} rounds of {args.steps} timed steps, torch {torch.__version__}")
    tps = {}
    for world, runs in results.items():
        times = [t for r in runs for t in r["times"]]
        med = statistics.median(times)
        tps[world] = world * batch * seq_len / med
        peak = max(r["peak_per_rank"] for r in runs)
        mfu = flops_per_token * tps[world] / world / (peak * 1e12)
        print(f"  {world} rank{'s' if world > 1 else ' '}  {tps[world]:>9.0f} tokens/s  step {med * 1e3:7.1f} ms "
              f"(median of {len(times)}, min {min(times) * 1e3:.1f})  MFU {mfu:6.1%} of a 1-thread fp32 matmul "
              f"({peak * 1e3:.1f} GFLOP/s)")
    print(f"  ratio 2 ranks / 1 rank: {tps[2] / tps[1]:.2f}x tokens/s (ideal 2.00x)")
    print(f"  load average before/after: {load_before} / {os.getloadavg()[0]:.2f} (other processes skew the figures)")
    return 0


def _malloc_name() -> str:
    """The allocator serving this process: glibc's unless one was preloaded. On CPU it matters: glibc unmaps
    large freed buffers and page-faults them in again on the next step, tcmalloc keeps them (docs/performance.md)."""
    preloaded = [lib for lib in ("tcmalloc", "jemalloc") if lib in os.environ.get("LD_PRELOAD", "")]
    return preloaded[0] if preloaded else "glibc"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"


def _flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    from megapile.model import GPT

    with torch.device("meta"):
        return GPT(cfg).flops_per_token(seq_len)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--batch", type=int, help="micro-batch size (default: the preset's)")
    p.add_argument("--seq-len", type=int, help="sequence length (default: the preset's)")
    p.add_argument("--steps", type=int, default=6, help="timed steps of each")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each first")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="model.compile: torch.compile each of our blocks")
    p.add_argument("--deepspeed", action="store_true", help="wrap ours in a one-rank ZeRO-0 engine")
    p.add_argument("--adam", choices=sorted(ADAM_IMPL), default="fused", help="AdamW implementation, both sides")
    p.add_argument("--hf-attn", default="sdpa", choices=["sdpa", "eager"], help="transformers attention")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="bf16: autocast on both sides")
    p.add_argument("--scaling", action="store_true",
                   help="instead of transformers: DeepSpeed with 2 ranks vs 1 rank, one thread per rank")
    p.add_argument("--zero", type=int, default=1, choices=[0, 1, 2], help="ZeRO stage for --scaling")
    p.add_argument("--rounds", type=int, default=2, help="--scaling: alternating 1-rank/2-rank rounds")
    p.add_argument("--scaling-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    shape, batch, seq_len = PRESETS[args.preset]
    batch, seq_len = args.batch or batch, args.seq_len or seq_len
    cfg = ModelConfig(**{"arch": "neox", **shape})
    if args.scaling_worker:
        scaling_worker(args, cfg, batch, seq_len)
        return 0
    if args.scaling:
        passed = [a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("--scaling",)]
        return run_scaling(args, passed, cfg, batch, seq_len)

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    ours_model, ours = ours_step_fn(cfg, seed=0, compile_model=args.compile, deepspeed_engine=args.deepspeed,
                                    batch=batch, adam=args.adam, device=device, dtype=dtype)
    _, theirs = hf_step_fn(cfg, args.hf_attn, args.adam, device, dtype)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=torch.Generator().manual_seed(0))
    x, y = tokens[:, :-1].to(device), tokens[:, 1:].to(device)
    mm = dict(device=device, dtype=dtype, n=8192 if device.type == "cuda" else 2048)

    load_before = f"{os.getloadavg()[0]:.2f}"
    peak = matmul_peak_tflops(**mm)
    times = {"megapile": [], "transformers": []}
    cpu_times = {"megapile": [], "transformers": []}  # process CPU seconds: less hurt by other load
    losses = {}
    for i in range(args.warmup + args.steps):
        for name, step in (("megapile", ours), ("transformers", theirs)):
            start, cpu_start = time.perf_counter(), time.process_time()
            losses[name] = step(x, y).item()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
                cpu_times[name].append(time.process_time() - cpu_start)

    peak = max(peak, matmul_peak_tflops(**mm))  # measured before and after: the better of the two
    flops_per_token = ours_model.flops_per_token(seq_len)  # same architecture, same count for both
    tokens_per_step = batch * seq_len
    label = "megapile" + (" (deepspeed ZeRO-0)" if args.deepspeed else "") + (" (compiled)" if args.compile else "")
    print(f"preset {args.preset}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads} heads, "
          f"vocab {cfg.vocab_size} (padded {cfg.padded_vocab_size}), batch {batch} x seq {seq_len}, "
          f"{torch.get_num_threads()} threads, AdamW {args.adam}, malloc {_malloc_name()}, torch {torch.__version__}")
    print(f"{ours_model.num_params(exclude_embedding=False) / 1e6:.2f}M parameters, "
          f"{flops_per_token / 1e6:.1f} MFLOP/token; {args.dtype} matmul peak {peak * 1e3:.1f} GFLOP/s (measured, "
          f"{mm['n']}^2 mm, best window before and after) on {_device_name(device)}")
    datasheet = None
    if device.type == "cuda":
        from megapile.training.flops import gpu_peak_tflops

        datasheet = gpu_peak_tflops(torch.cuda.get_device_name(device))
    tps = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        tps[name] = tokens_per_step / med
        mfu = flops_per_token * tps[name] / (peak * 1e12)
        hf_name = {"neox": "GPTNeoX", "llama": "Llama"}[cfg.arch]
        shown = label if name == "megapile" else f"transformers {hf_name} ({args.hf_attn})"
        sheet = f" ({flops_per_token * tps[name] / (datasheet * 1e12):.1%} of datasheet)" if datasheet else ""
        print(f"  {shown:<32} {tps[name]:>9.0f} tokens/s  step {med * 1e3:7.1f} ms (median of {len(ts)}, "
              f"min {min(ts) * 1e3:.1f})  {flops_per_token * tps[name] / 1e12:.3f} TFLOP/s  MFU {mfu:6.1%}{sheet}  "
              f"last loss {losses[name]:.3f}")
    best = min(times["transformers"]) / min(times["megapile"])
    cpu = statistics.median(cpu_times["transformers"]) / statistics.median(cpu_times["megapile"])
    print(f"  ratio megapile / transformers: {tps['megapile'] / tps['transformers']:.2f}x "
          f"(median steps; {best:.2f}x by fastest steps, {cpu:.2f}x by median process CPU time)")
    print(f"  load average before/after: {load_before} / {os.getloadavg()[0]:.2f} (other processes skew the figures)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
