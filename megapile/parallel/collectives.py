"""Small agreements between all ranks: every rank must act at the same step on the same numbers."""
from __future__ import annotations

import torch
import torch.distributed as dist


def any_rank(flags: list[bool], world_size: int) -> list[bool]:
    """Each flag true on every rank when it is true on one (one all-reduce)."""
    if world_size == 1:
        return list(flags)
    t = torch.tensor([int(f) for f in flags])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def mean_over_ranks(value: torch.Tensor, world_size: int) -> float:
    if world_size > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= world_size
    return float(value)
