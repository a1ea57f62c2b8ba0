"""Small agreements between all ranks: every rank must act at the same step on the same numbers."""
from __future__ import annotations

import torch
import torch.distributed as dist


def any_rank(flags: list[bool], world_size: int) -> list[bool]:
    """Each flag true on every rank when it is true on one (one all-reduce)."""
    return agree(flags, [], world_size)[0]


def mean_over_ranks(value: torch.Tensor, world_size: int) -> float:
    if world_size > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= world_size
    return float(value)


def agree(flags: list[bool], values: list[float], world_size: int) -> tuple[list[bool], list[float]]:
    """`any_rank` of the flags and the mean over ranks of the values, in one all-reduce (a NaN value stays NaN)."""
    if world_size == 1:
        return list(flags), list(values)
    t = torch.tensor([float(f) for f in flags] + list(values), dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    out = t.tolist()
    return [v > 0 for v in out[:len(flags)]], [v / world_size for v in out[len(flags):]]
