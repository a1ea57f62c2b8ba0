"""`megapile ckpt info|verify|consolidate DIR`: look into a checkpoint without starting a run.

DIR is one checkpoint (`.../global_step300`) or a checkpoint directory, meaning its newest good checkpoint.
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import sys

from safetensors.torch import save_file

from megapile.checkpoint import (
    STATE_FILE,
    Found,
    carried_tokenizer,
    find_resumable,
    fragments,
    list_complete,
    manifest,
    state_file,
)
from megapile.checkpoint.portable import read_full_weights
from megapile.config import ConfigError


def resolve(path: str) -> Found:
    """The checkpoint DIR names; raise FileNotFoundError with a one-line reason."""
    path = os.path.normpath(path)
    if os.path.exists(os.path.join(path, STATE_FILE)):
        state = state_file.read(path)
        return Found(path, os.path.basename(path), state.step, state)
    if list_complete(path):
        found = find_resumable(path)
        if found:
            return found
        raise FileNotFoundError(f"{path}: no checkpoint in it verifies")
    raise FileNotFoundError(f"{path}: not a megapile checkpoint or checkpoint directory")


def info(found: Found) -> str:
    s = found.state
    model = s.config["model"]
    size = manifest.total_bytes(found.path)
    problems = manifest.verify(found.path, checksums=False)
    lines = [
        f"checkpoint   {found.path}",
        f"step         {s.step} (global sample index {s.sample_index}, {s.tokens_seen:,} tokens seen)",
        f"layout       {_layout(s)}",
        f"model        {model['arch']}: {model['num_layers']} layers, hidden {model['hidden_size']}, "
        f"{model['num_heads']} heads, vocab {model['vocab_size']}",
        f"size         {size / 1e6:.1f} MB in {len(os.listdir(found.path))} files"
        + ("" if not problems else f" (INCOMPLETE: {problems[0]})"),
        "saved by     " + ", ".join(f"{k} {v}" for k, v in s.versions.items()) + f" (state format {s.format})",
        "resumes on   " + _resumes_on(found),
        "tokenizer    " + _tokenizer_line(found),
        "skipped      " + _skipped_line(s.skip_samples),
    ]
    return "\n".join(lines)


def _skipped_line(ranges: list) -> str:
    """The global sample ranges this run never trains (train.skip_samples, loss-spike rollbacks)."""
    if not ranges:
        return "no samples"
    shown = ", ".join(f"[{a}, {b})" for a, b in ranges)
    return f"{sum(b - a for a, b in ranges)} global samples: {shown}"


def _tokenizer_line(found: Found) -> str:
    carried = carried_tokenizer(found.path)
    sha = found.state.fingerprints.get("tokenizer") or "none recorded"
    if carried:
        return f"carried ({', '.join(sorted(os.listdir(carried)))}), sha256 {sha[:12]}"
    return f"not carried (saved before checkpoints carried it): {found.state.config['data'].get('tokenizer')}"


def _layout(state: state_file.RunState) -> str:
    tp, pp = state.tensor, state.pipeline
    dp = state.world_size // (tp * pp)
    grid = f"tensor {tp} x pipeline {pp} x data {dp}, " if tp * pp > 1 else ""
    return f"{grid}ZeRO-{state.zero_stage} on {state.world_size} rank(s)"


def _resumes_on(found: Found) -> str:
    if fragments.present(found.path):  # layout-free slices (megapile/checkpoint/fragments.py)
        return ("any layout: tensor, pipeline and data-parallel sizes, ZeRO stage 0-3, bf16/fp32/fp16, each rank "
                "reading its slices of the fp32 masters and Adam moments, with the data position; "
                "bit-identical on the layout that wrote it")
    if found.state.tensor * found.state.pipeline > 1:  # saved before checkpoints carried slices
        return ("the same tensor x pipeline x data layout exactly (bit-identical; saved before checkpoints carried "
                "slices); for another layout, `megapile ckpt consolidate` gives its weights")
    return ("the same layout exactly (bit-identical); any ZeRO stage 0-3 and any data-parallel size "
            "through megapile's resharding (weights and Adam moments carried)")


def consolidate(found: Found, output: str) -> int:
    """Write the fp32 weights of any layout to one safetensors file; return the number of tensors."""
    weights = read_full_weights(found.path, found.state.zero_stage)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tmp = output + ".tmp"
    save_file({k: v.contiguous() for k, v in weights.items()}, tmp,
              metadata={"step": str(found.step), "model": json.dumps(found.state.config["model"])})
    os.replace(tmp, output)
    return len(weights)


def tokenizer_copies(found: Found, directory: str) -> list[tuple[str, str]]:
    """(source, target) pairs that put the tokenizer a checkpoint carries into `directory`, beside consolidated
    weights. A different file already there under that name is an error: it is never overwritten."""
    carried = carried_tokenizer(found.path)
    pairs = [(os.path.join(carried, name), os.path.join(directory, name))
             for name in (sorted(os.listdir(carried)) if carried else [])]
    for source, target in pairs:
        if os.path.exists(target) and not filecmp.cmp(target, source, shallow=False):
            raise FileExistsError(f"{target} exists and is not this checkpoint's tokenizer; not overwritten")
    return pairs


def add_cli(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    for name, help_ in (("info", "step, layout, sizes, what it can resume on"),
                        ("verify", "check every file against the manifest (size and CRC32)")):
        sub.add_parser(name, help=help_).add_argument("dir")
    cons = sub.add_parser("consolidate", help="fp32 weights of any layout to one .safetensors file")
    cons.add_argument("dir")
    cons.add_argument("--output", "-o", required=True)


def cli_main(args: argparse.Namespace) -> int:
    try:
        if args.action == "verify" and list_complete(args.dir) and not os.path.exists(os.path.join(args.dir, STATE_FILE)):
            bad = 0
            for _, tag in list_complete(args.dir):  # a checkpoint directory: verify every checkpoint in it
                problems = manifest.verify(os.path.join(args.dir, tag))
                bad += bool(problems)
                print(f"{tag}: " + ("ok" if not problems else "DAMAGED: " + "; ".join(problems)))
            return 1 if bad else 0
        found = resolve(args.dir)
    except (FileNotFoundError, ConfigError) as e:  # ConfigError: a state format newer than this megapile
        print(f"megapile: error: {e}", file=sys.stderr)
        return 1
    if args.action == "info":
        print(info(found))
    elif args.action == "verify":
        problems = manifest.verify(found.path)
        print(f"{found.tag}: " + ("ok" if not problems else "DAMAGED: " + "; ".join(problems)))
        return 1 if problems else 0
    else:
        try:
            copies = tokenizer_copies(found, os.path.dirname(os.path.abspath(args.output)))
        except FileExistsError as e:
            print(f"megapile: error: {e}", file=sys.stderr)
            return 1
        count = consolidate(found, args.output)
        for source, target in copies:
            shutil.copyfile(source, target)
        print(f"wrote {args.output}: {count} fp32 tensors from {found.path}"
              + (f"; its tokenizer: {', '.join(t for _, t in copies)}" if copies else ""))
    return 0
