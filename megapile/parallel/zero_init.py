"""ZeRO-3 for models that do not fit one device: each rank builds and initialises only its partition of every
parameter, never the whole model.

The model is constructed inside DeepSpeed's `zero.Init`, which partitions each module's parameters as soon as the
module exists (a rank holds one module's full parameters at most, briefly, while it is built). Each rank then
fills its own partition from `GPT.initial_value`, a function of (seed, name, shape) only: one parameter at a time
in full, on the CPU, no communication, and the same values `build_model` gives every other layout.
"""
from __future__ import annotations

from typing import Any, Optional

import deepspeed
import torch
import torch.distributed as dist

from megapile.config import ModelConfig
from megapile.model import GPT


def build_partitioned(cfg: ModelConfig, seed: int, ds_config: dict[str, Any], device: torch.device,
                      init_weights: Optional[dict[str, torch.Tensor]] = None) -> GPT:
    """The plain GPT with every parameter ZeRO-3 partitioned over the data-parallel group and initialised (from
    `init_weights`, a full state dict, when given: model.init_from)."""
    # Construction draws from the global generator (each nn.Linear's default init, overwritten below); keep the
    # streams the data order and dropout use as they were.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = GPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            full = init_weights[name] if init_weights is not None else GPT.initial_value(model, name,
                                                                                         tuple(p.ds_shape), seed)
            fill_partition(p, full)
    return model


def fill_partition(p: torch.nn.Parameter, full: torch.Tensor) -> None:
    """This rank's partition of ZeRO-3 parameter `p` from its full value: rank r of the partition group holds
    elements [r·P, r·P + P) of the flattened parameter, the last partition zero-padded."""
    size = p.ds_tensor.numel()
    start = dist.get_rank(group=p.ds_process_group) * size
    part = full.reshape(-1)[start:start + size]
    p.ds_tensor.zero_()
    p.ds_tensor[:part.numel()].copy_(part.to(p.ds_tensor.device, p.ds_tensor.dtype))
