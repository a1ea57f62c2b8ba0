"""Benchmark: generation tokens/s with and without the KV cache, and against transformers' `generate`
on the same model exported to a Hugging Face directory.

A randomly initialised model of the config's shape (default: pythia-70m) writes --new-tokens tokens greedily
after a --prompt-len-token prompt for --batch prompts; every variant must produce the same tokens. Prints
tokens/s (new tokens, all rows) for each and the ratios.

    python bench/generate.py [--config configs/pythia-70m.yaml] [--prompt-len 32] [--new-tokens 64] [--batch 1]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def timed(fn, repeats: int):
    fn()  # warm-up
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    import transformers

    from megapile.config import load_config
    from megapile.evaluation.generate import generate
    from megapile.hf.export import write_hf_dir
    from megapile.model import build_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/pythia-70m.yaml")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per variant; the best counts")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    cfg = load_config(args.config).model
    cfg.vocab_size = cfg.vocab_size or 50277
    device = torch.device(args.device)
    model = build_model(cfg, seed=0, device=device).eval()
    prompts = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt_len), generator=torch.Generator().manual_seed(0))
    prompt_lists = prompts.tolist()
    n = args.batch * args.new_tokens

    with tempfile.TemporaryDirectory() as hf_dir:
        write_hf_dir(cfg, {k: v.cpu() for k, v in model.state_dict().items()}, None, hf_dir)
        hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(device).eval()

    def ours(cache: bool):
        return lambda: generate(model, prompt_lists, args.new_tokens, use_cache=cache)

    def theirs():
        with torch.no_grad():
            out = hf.generate(prompts.to(device), attention_mask=torch.ones_like(prompts).to(device),
                              max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                              pad_token_id=0, eos_token_id=None)
        return out[:, args.prompt_len:].tolist()

    t_cache, out_cache = timed(ours(True), args.repeats)
    t_full, out_full = timed(ours(False), args.repeats)
    t_hf, out_hf = timed(theirs, args.repeats)
    params = model.num_params(exclude_embedding=False) / 1e6
    print(f"{args.config}: {params:.1f}M parameters on {device}, {torch.get_num_threads()} threads; batch {args.batch}, "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy")
    print(f"same tokens: KV cache vs none {out_cache == out_full}, megapile vs transformers {out_cache == out_hf}")
    print(f"megapile, KV cache            {n / t_cache:9.1f} tokens/s")
    print(f"megapile, no cache            {n / t_full:9.1f} tokens/s")
    print(f"transformers generate (cache) {n / t_hf:9.1f} tokens/s")
    print(f"KV cache speed-up: {t_full / t_cache:.2f}x;  megapile / transformers: {t_hf / t_cache:.2f}x")


if __name__ == "__main__":
    main()
