"""The `megapile` command: each subcommand lives in its own module.

A module named here provides `add_cli(parser)` and `cli_main(args) -> int`. Modules are
imported only when their subcommand runs, so `megapile data ...` does not pay for torch (~1.5 s to import)
or deepspeed (~0.5 s more, and its "Setting accelerator to CPU" line on a machine without a GPU).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from megapile.runtime.process_exit import exit_now

COMMANDS = {
    "data": ("megapile.data.sample_corpus", "build the small built-in Pile-format corpus"),
    "tokenizer": ("megapile.data.tokenizer", "train a byte-level BPE tokenizer"),
    "preprocess": ("megapile.data.preprocess", "tokenize jsonl(.zst) into Megatron .bin/.idx"),
    "config": ("megapile.config_show", "show the resolved run config and the DeepSpeed JSON generated from it"),
    "train": ("megapile.train", "train a model (same as python megapile/train.py)"),
    "ckpt": ("megapile.checkpoint.tools", "inspect, verify or consolidate a checkpoint"),
    "plan": ("megapile.parallel.plan", "estimate memory per GPU of parallel layouts for a model"),
    "plot": ("megapile.reporting.plot", "plot loss, lr and tokens/s of one or more runs to a PNG"),
    "eval": ("megapile.evaluation.evaluate", "loss, perplexity and bits per byte on Pile-format or preprocessed data"),
    "generate": ("megapile.evaluation.generate", "sample text from a checkpoint or an exported model"),
    "export-hf": ("megapile.hf.export", "write a checkpoint as a Hugging Face transformers directory"),
}


def _usage() -> str:
    lines = ["usage: megapile COMMAND [ARGS ...]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"megapile: unknown command '{name}'\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"megapile {name}", description=COMMANDS[name][1])
    module.add_cli(parser)
    # Overrides and files may come before or after options, as on a `megapile train` line, where the module
    # allows it (argparse cannot intermix with subcommands such as `ckpt info`).
    intermixed = getattr(module, "INTERMIXED_ARGS", False)
    args = (parser.parse_intermixed_args if intermixed else parser.parse_args)(argv[1:])
    return int(module.cli_main(args) or 0)


def run() -> None:
    """The `megapile` console script: main(), then leave without interpreter teardown, which DeepSpeed's
    ZeRO-3 can turn into an abort of a finished run (megapile/runtime/process_exit.py)."""
    exit_now(main())


if __name__ == "__main__":
    run()
