"""Tensor parallelism for evaluation: a model too large for one device, split over the ranks of a group.

Each rank holds its part of the linears that training splits (the family's `TensorPlan`, which training reads
too: whole key/value heads of `attn.qkv`, columns of `mlp.gate`/`mlp.fc_in`, input features of `attn.proj`/`mlp.fc_out`)
and everything else whole. Column-parallel linears need no change (Attention and the MLPs run on a shard as
they are); each row-parallel linear becomes `RowParallel`, which sums the partial outputs over the group and
adds the bias once. Training gets the same split from DeepSpeed's AutoTP inside its engine; evaluation builds
no engine (no optimizer, no ZeRO), so the one all-reduce per row-parallel linear is here.

The parts are read straight from the checkpoint's slices (`part(name, split_dim)`), one parameter at a time,
so no rank ever holds the whole model.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from megapile.config import ModelConfig
from megapile.model import GPT, meta_gpt


class RowParallel(nn.Module):
    """x @ weightᵀ summed over the tensor group, then the bias (whole on every rank) once."""

    def __init__(self, linear: nn.Linear, group):
        super().__init__()
        self.weight, self.bias, self.group = linear.weight, linear.bias, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias


def check_split(cfg: ModelConfig, tensor: int) -> None:
    """Refuse a split that does not give every rank whole key/value heads and equal MLP parts (one line)."""
    if cfg.kv_heads % tensor or cfg.ffn_size % tensor:
        raise ValueError(f"--tensor-parallel {tensor} must divide the model's {cfg.kv_heads} key/value heads "
                         f"and its MLP width {cfg.ffn_size}")


def local_shape(shape: list[int], dim: Optional[int], tensor: int) -> list[int]:
    shape = list(shape)
    if dim is not None:
        shape[dim] //= tensor
    return shape


def build_split(cfg: ModelConfig, part: Callable[[str, Optional[int]], torch.Tensor], tensor: int, group,
                device: torch.device, dtype: torch.dtype) -> GPT:
    """The GPT in eval mode with this rank's parts in `dtype` on `device`. `part(name, split_dim)`: this rank's
    part of parameter `name` cut along `split_dim` (None: whole), in its local shape. `tensor` = 1: the whole
    model (and `group` is not used)."""
    if tensor > 1:
        check_split(cfg, tensor)
    plan = cfg.family.tensor_plan
    model = meta_gpt(cfg)
    for name, _ in list(model.named_parameters()):
        dim = plan.split_dim(name) if tensor > 1 else None
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        setattr(module, leaf, nn.Parameter(part(name, dim).to(device, dtype), requires_grad=False))
    if tensor > 1:
        for name, module in list(model.named_modules()):
            if plan.is_row(name):
                owner, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(owner), leaf, RowParallel(module, group))
    return model.eval()


def cut(full: dict[str, torch.Tensor], tensor: int, rank: int) -> Callable[[str, Optional[int]], torch.Tensor]:
    """`part` for weights already whole in memory (a Hugging Face directory, a checkpoint without slices)."""
    def part(name: str, dim: Optional[int]) -> torch.Tensor:
        value = full.pop(name)  # dropped as it is used: the whole model is held once, not twice
        return value if dim is None else value.chunk(tensor, dim=dim)[rank].clone()

    return part


def groups(world_size: int, tensor: int) -> list:
    """The tensor groups, consecutive ranks [0, tensor), [tensor, 2 tensor), ...: every rank creates every group."""
    return [dist.new_group(list(range(start, start + tensor))) for start in range(0, world_size, tensor)]
