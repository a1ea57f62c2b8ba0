"""Training throughput: megapile's step against transformers' GPTNeoXForCausalLM + AdamW.

Both run the identical shape on the same random batch with the same thread count, in one
process, with their steps interleaved (ours, theirs, ours, ...) so machine noise hits both
alike. Prints tokens/s of each, the ratio, and MFU of each against a fp32 matmul peak
measured in the same run.

    python bench/train_throughput.py --preset tiny --threads 2
    python bench/train_throughput.py --preset pythia-14m --threads 2 --steps 4
    python bench/train_throughput.py --preset tiny --deepspeed      # ours inside a ZeRO-0 engine

"Our step" is megapile's: GPT (model.py) + torch AdamW over param_groups (no decay on biases
and norms) + global grad-norm clipping; with --deepspeed, the same model and optimizer wrapped by
deepspeed.initialize on one rank. "Their step" is the plain transformers loop: model(input_ids,
labels=...) -> loss.backward() -> clip -> torch.optim.AdamW.step(), with transformers' default
attention (sdpa) unless --hf-attn says otherwise. Both use the same AdamW implementation
(--adam, default fused as the transformers Trainer does), so the ratio measures the models.
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
}
LR, WEIGHT_DECAY, BETAS, CLIP = 1e-3, 0.1, (0.9, 0.95), 1.0
# torch.optim.AdamW implementations; both sides always use the same one. "fused" is what the
# transformers Trainer uses by default with torch >= 2.8; "plain" is torch's default on CPU (a
# per-tensor loop, ~10x slower than fused on CPU).
ADAM_IMPL = {"fused": {"fused": True}, "foreach": {"foreach": True}, "plain": {"foreach": False}}


def ours_step_fn(cfg: ModelConfig, seed: int, compile_model: bool, deepspeed_engine: bool, batch: int, adam: str):
    from megapile.model import build_model, param_groups

    model = build_model(cfg, seed=seed).train()
    opt = torch.optim.AdamW(param_groups(model, WEIGHT_DECAY), lr=LR, betas=BETAS, **ADAM_IMPL[adam])
    if deepspeed_engine:
        engine = _deepspeed_engine(model, opt, batch)

        def step(x, y):
            loss = engine(x, targets=y)
            engine.backward(loss)
            engine.step()
            return loss.detach()

        return model, step
    fwd = torch.compile(model) if compile_model else model

    def step(x, y):
        loss = fwd(x, targets=y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return model, step


def hf_step_fn(cfg: ModelConfig, attn: str, adam: str):
    import transformers

    from megapile.hf_convert import config_to_hf

    hf_cfg = config_to_hf(cfg)
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM._from_config(hf_cfg, attn_implementation=attn).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, **ADAM_IMPL[adam])

    def step(x, y):
        # HF shifts labels itself; passing the inputs as labels trains on the same next tokens.
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return model, step


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


def matmul_peak_tflops(n: int = 2048, seconds: float = 1.0) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    iters, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        iters += 1
    return 2 * n**3 * iters / (time.perf_counter() - start) / 1e12


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--batch", type=int, help="micro-batch size (default: the preset's)")
    p.add_argument("--seq-len", type=int, help="sequence length (default: the preset's)")
    p.add_argument("--steps", type=int, default=6, help="timed steps of each")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each first")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="torch.compile our model")
    p.add_argument("--deepspeed", action="store_true", help="wrap ours in a one-rank ZeRO-0 engine")
    p.add_argument("--adam", choices=sorted(ADAM_IMPL), default="fused", help="AdamW implementation, both sides")
    p.add_argument("--hf-attn", default="sdpa", choices=["sdpa", "eager"], help="transformers attention")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    shape, batch, seq_len = PRESETS[args.preset]
    batch, seq_len = args.batch or batch, args.seq_len or seq_len
    cfg = ModelConfig(arch="neox", **shape)

    ours_model, ours = ours_step_fn(cfg, seed=0, compile_model=args.compile, deepspeed_engine=args.deepspeed,
                                    batch=batch, adam=args.adam)
    _, theirs = hf_step_fn(cfg, args.hf_attn, args.adam)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=torch.Generator().manual_seed(0))
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    load_before = f"{os.getloadavg()[0]:.2f}"
    peak = matmul_peak_tflops()
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

    flops_per_token = ours_model.flops_per_token(seq_len)  # same architecture, same count for both
    tokens_per_step = batch * seq_len
    label = "megapile" + (" (deepspeed ZeRO-0)" if args.deepspeed else "") + (" (compiled)" if args.compile else "")
    print(f"preset {args.preset}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads} heads, "
          f"vocab {cfg.vocab_size} (padded {cfg.padded_vocab_size}), batch {batch} x seq {seq_len}, "
          f"{torch.get_num_threads()} threads, AdamW {args.adam}, torch {torch.__version__}")
    print(f"{ours_model.num_params(exclude_embedding=False) / 1e6:.2f}M parameters, "
          f"{flops_per_token / 1e6:.1f} MFLOP/token; fp32 matmul peak {peak * 1e3:.1f} GFLOP/s (measured, 2048^2 mm)")
    tps = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        tps[name] = tokens_per_step / med
        mfu = flops_per_token * tps[name] / (peak * 1e12)
        shown = label if name == "megapile" else f"transformers GPTNeoX ({args.hf_attn})"
        print(f"  {shown:<32} {tps[name]:>9.0f} tokens/s  step {med * 1e3:7.1f} ms (median of {len(ts)}, "
              f"min {min(ts) * 1e3:.1f})  MFU {mfu:6.1%}  last loss {losses[name]:.3f}")
    best = min(times["transformers"]) / min(times["megapile"])
    cpu = statistics.median(cpu_times["transformers"]) / statistics.median(cpu_times["megapile"])
    print(f"  ratio megapile / transformers: {tps['megapile'] / tps['transformers']:.2f}x "
          f"(median steps; {best:.2f}x by fastest steps, {cpu:.2f}x by median process CPU time)")
    print(f"  load average before/after: {load_before} / {os.getloadavg()[0]:.2f} (other processes skew the figures)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
