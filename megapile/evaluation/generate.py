"""`megapile generate`: sample text from a training checkpoint (any layout) or an exported HF directory.

    megapile generate --checkpoint runs/x/checkpoints --prompt "The Pile is" --max-new-tokens 64 \\
        --temperature 0.8 --top-p 0.95 [--top-k 50] [--seed 0] [--prompt "another" ...] [--no-cache]

    torchrun --nproc_per_node 2 -m megapile.cli generate --tensor-parallel 2 --checkpoint ... --prompt ...

Temperature 0 is greedy decoding. Several prompts run as one batch, left-padded (each row's positions
count from its own first token, and no token attends to padding). A row stops at `<|endoftext|>`.
With one prompt, tokens stream to the console as they are produced.

With --tensor-parallel N (for a model that does not fit one device) the N processes hold one copy of the model
split N ways, as `megapile eval --tensor-parallel` does: each rank reads only its parts from the checkpoint
(megapile/parallel/tensor_inference.py) and caches only its own key/value heads. Every rank runs the same
decoding loop with the same seeded generator; the token rank 0 chooses is broadcast each step, so the ranks
cannot drift apart, and the tokens are those one process writes. Only rank 0 prints.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megapile.hf.export import ExportError, load_model
from megapile.runtime import distributed


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,). temperature 0: argmax; top_k 0 and top_p 1: no filtering."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability mass strictly above each token
        sorted_logits = sorted_logits.masked_fill(before >= top_p, float("-inf"))  # the top token always stays
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, eod_id: Optional[int] = None,
             use_cache: bool = True, pad_id: int = 0,
             on_token: Optional[Callable[[int, int], None]] = None, group=None) -> list[list[int]]:
    """The new tokens of each prompt (up to and including `eod_id`, where it stops).

    `on_token(row, token)` is called for every token as it is chosen. Without the cache, every step
    recomputes the whole sequence (the baseline the KV cache is measured against). `group`: the tensor group
    a split model runs on (every rank of it calls this); its first rank's tokens are everyone's.
    """
    cfg = model.cfg
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = next(model.parameters()).device
    B, longest = len(prompts), max(len(p) for p in prompts)
    total = longest + max_new_tokens
    if total > cfg.max_seq_len:
        raise ValueError(f"prompt ({longest} tokens) + max new tokens ({max_new_tokens}) exceeds the model's "
                         f"context of {cfg.max_seq_len} tokens")
    pad = torch.tensor([longest - len(p) for p in prompts], device=device)
    ids = torch.tensor([[pad_id] * (longest - len(p)) + list(p) for p in prompts], device=device)  # (B, T0)
    generator = torch.Generator(device=device).manual_seed(seed)
    cache = model.kv_cache(B, total, pad) if use_cache else None
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in range(B)]
    step_input = ids
    for _ in range(max_new_tokens):
        if cache is not None:
            logits = model.forward_cached(step_input, cache)[:, -1]
        elif not bool(pad.any()):
            logits = model(ids)[:, -1]
        else:  # no cache, padded rows: recompute everything through a fresh one
            logits = model.forward_cached(ids, model.kv_cache(B, ids.shape[1], pad))[:, -1]
        nxt = sample_next(logits[:, : cfg.vocab_size], temperature, top_k, top_p, generator)  # (B,)
        if group is not None:
            nxt = first_ranks_tokens(nxt, group)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        for row in range(B):
            if not done[row]:
                token = int(nxt[row])
                out[row].append(token)
                if on_token is not None:
                    on_token(row, token)
        if eod_id is not None:
            done |= nxt == eod_id
        if bool(done.all()):
            break
        step_input = nxt[:, None]
        ids = torch.cat([ids, step_input], dim=1)
    return out


def first_ranks_tokens(tokens: torch.Tensor, group) -> torch.Tensor:
    """The tokens the group's first rank chose, on every rank. Its ranks see the same all-reduced logits and draw
    from identically seeded generators, so they should agree anyway; this makes sure, since ranks that fed
    different tokens on would no longer hold parts of one model's cache."""
    dist.broadcast(tokens, src=dist.get_global_rank(group, 0), group=group)
    return tokens


class Streamer:
    """Prints one row's text as tokens arrive, holding back bytes that do not yet form whole characters."""

    def __init__(self, tokenizer, write: Callable[[str], None]):
        self.tokenizer, self.write = tokenizer, write
        self.tokens: list[int] = []
        self.printed = 0

    def __call__(self, row: int, token: int) -> None:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return
        self.write(text[self.printed:])
        self.printed = len(text)


def add_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint, a checkpoint directory (its newest good checkpoint) or an HF directory")
    parser.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep this much mass (1: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step")
    parser.add_argument("--tokenizer", help="tokenizer to use (default: the checkpoint's own copy; another must be byte-identical)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="weights and compute (bf16: half the memory, for models that do not fit in fp32)")
    parser.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                        help="split the model over the N processes of the launch (whole key/value heads each; for a "
                             "model that does not fit one device); they write the tokens one process does")


def local_device(requested: Optional[str], env: distributed.DistEnv) -> torch.device:
    """--device; where it names cuda or nothing, this rank's own GPU when there is one (several ranks per node)."""
    if requested is None or (requested == "cuda" and torch.cuda.is_available()):
        return distributed.local_device(env, os.environ)
    return torch.device(requested)


def fail(message: str) -> int:
    print(f"megapile: error: {message}", file=sys.stderr)
    return 1


def cli_main(args: argparse.Namespace) -> int:
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0 or args.max_new_tokens < 1:
        return fail("need --temperature >= 0, 0 < --top-p <= 1, --top-k >= 0 and --max-new-tokens >= 1")
    tp = args.tensor_parallel
    if tp < 1:
        return fail("--tensor-parallel must be >= 1")
    try:
        env = distributed.detect(os.environ)
        device = local_device(args.device, env)
    except distributed.LaunchError as e:
        return fail(str(e))
    if env.world_size != tp:  # one copy of the model: more processes would only repeat its work
        return fail(f"--tensor-parallel {tp} needs exactly {tp} processes (torchrun --nproc_per_node {tp}), "
                    f"got {env.world_size}")
    if tp == 1:
        return generate_and_print(args, device, 0, None, True)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        distributed.init(env, backend="nccl" if device.type == "cuda" else "gloo")
    except distributed.LaunchError as e:
        return fail(str(e))
    try:
        return generate_and_print(args, device, env.rank, dist.group.WORLD, env.is_main)
    finally:
        distributed.shutdown()


def generate_and_print(args: argparse.Namespace, device: torch.device, tensor_rank: int, group, prints: bool) -> int:
    """Load this rank's part of the model (all of it without a tensor `group`), generate, print where `prints`."""
    error = None
    try:
        loaded = load_model(args.checkpoint, device, args.tokenizer, args.dtype, args.tensor_parallel,
                            tensor_rank, group)
    except (ExportError, KeyError) as e:
        error = str(e)
    if not loaded_everywhere(error, group, prints):
        return 1
    tok = loaded.tokenizer
    prompts = [tok.encode(p) or [tok.eod_id] for p in args.prompt]  # "": start a new document
    streaming = prints and len(prompts) == 1
    streamer = Streamer(tok, lambda s: print(s, end="", flush=True)) if streaming else None
    if streaming:
        print(args.prompt[0], end="", flush=True)
    try:
        outputs = generate(loaded.model, prompts, args.max_new_tokens, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, seed=args.seed, eod_id=tok.eod_id,
                           use_cache=not args.no_cache, pad_id=tok.pad_id, on_token=streamer, group=group)
    except ValueError as e:  # checked before the first step, alike on every rank: said once
        return fail(str(e)) if prints else 1
    if streaming:
        print(tok.decode(streamer.tokens)[streamer.printed:])
    elif prints:
        for i, (prompt, new) in enumerate(zip(args.prompt, outputs)):
            print(f"--- [{i}] " + prompt + tok.decode(new))
    return 0


def loaded_everywhere(error: Optional[str], group, first: bool) -> bool:
    """Whether every rank of the tensor `group` (this process alone without one) loaded its part, so that no rank
    is left waiting in the first all-reduce for one that gave up. A failure is said once: by the first rank when
    it failed too (the same files, most likely the same error), else by each rank that failed."""
    failed = [error is not None]
    if group is not None:
        failed = [False] * dist.get_world_size(group)
        dist.all_gather_object(failed, error is not None, group=group)
    if error is not None and (first or not failed[0]):
        fail(error)
    return not any(failed)
