"""Optimizer and learning-rate schedule, built from OptimConfig."""
from __future__ import annotations

import math
from functools import partial

import torch
from deepspeed.ops.adam import DeepSpeedCPUAdam

from megapile.config import OptimConfig


def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Multiplier on cfg.lr for optimizer step `step` (0-based): linear warmup, then decay to min_lr_ratio."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps  # step 0 already learns; never a wasted zero-lr step
    if cfg.schedule == "constant":
        return 1.0
    decay_steps = cfg.decay_steps or max_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps))
    if cfg.schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:  # linear
        shape = 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_optimizer(groups: list[dict], cfg: OptimConfig, cpu_offload: bool) -> torch.optim.Optimizer:
    """AdamW over the given parameter groups; DeepSpeed's CPU Adam when ZeRO offloads the optimizer."""
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if cpu_offload:  # DeepSpeed refuses other optimizers with offload_optimizer
        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    # The fused kernel is ~10x faster than the default per-tensor loop on CPU and faster on GPU too.
    return torch.optim.AdamW(groups, fused=cfg.fused, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, cfg=cfg, max_steps=max_steps))
