"""`megapile config show`: the run config as training would resolve it, and the DeepSpeed config generated from it.

    megapile config show configs/tiny.yaml
    megapile config show configs/tiny.yaml ds_configs/zero2.json --world_size 8 parallel.tensor=2

Nothing starts: no processes, no model. The same checks as `megapile train` apply (unknown keys, batch
arithmetic, layout, a DeepSpeed JSON that disagrees with the YAML), with the same one-line errors.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import yaml

from megapile.config import ConfigError, load_config
from megapile.parallel.ds_config import resolve_parallel
from megapile.parallel.layout import pad_vocab_for_tensor

INTERMIXED_ARGS = True  # megapile/cli.py: `section.key=value` overrides before or after the options


def add_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["show"], help="show: print the resolved run config and DeepSpeed JSON")
    parser.add_argument("files", nargs="*", metavar="CONFIG.yaml|DS.json|section.key=value",
                        help="the run config, a DeepSpeed JSON (optional), and overrides, as `megapile train` takes them")
    parser.add_argument("--config", help="the run config (or give it as the first file)")
    parser.add_argument("--deepspeed_config", "--deepspeed-config", help="a DeepSpeed JSON (or give it as a file)")
    parser.add_argument("--world_size", "--world-size", type=int, default=1,
                        help="ranks the run would have: sets the data-parallel size (default 1)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="what train.dtype auto resolves for (default: cuda when a GPU is visible)")


def cli_main(args: argparse.Namespace) -> int:
    config, ds_json, overrides = args.config, args.deepspeed_config, []
    for item in args.files:
        if "=" in item:
            overrides.append(item)
        elif item.endswith(".json") and ds_json is None:
            ds_json = item
        elif config is None:
            config = item
        else:
            print(f"megapile: error: config show: one run config and one DeepSpeed JSON at most; got {item!r} too",
                  file=sys.stderr)
            return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        cfg = load_config(config, overrides)
        pad_vocab_for_tensor(cfg)
        layout, ds_config, _ = resolve_parallel(cfg, ds_json, args.world_size, device)
    except ConfigError as e:
        print(f"megapile: error: {e}", file=sys.stderr)
        return 1
    print(f"# run config, resolved ({layout.describe()} on {args.world_size} rank(s))")
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    print("# DeepSpeed config, generated (what deepspeed.initialize receives)")
    print(json.dumps(ds_config, indent=2))
    return 0
