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


# What a resume takes from the config in force, not from the checkpoint: the optimizer's settings and the whole LR
# schedule. The checkpoint says only where training stands (the scheduler's step count, Adam's moments and step).
RESUMED_FROM_CONFIG = ("lr", "min_lr_ratio", "warmup_steps", "decay_steps", "schedule", "weight_decay", "beta1",
                       "beta2", "eps", "grad_clip")
_GROUP_SETTINGS = ("initial_lr", "betas", "eps", "weight_decay")


def group_settings(scheduler) -> list[dict]:
    """Each parameter group's settings as this run's config built them; take them before loading a checkpoint."""
    return [{k: g[k] for k in _GROUP_SETTINGS if k in g} for g in scheduler.optimizer.param_groups]


def follow_config(scheduler, settings: list[dict]) -> None:
    """After a checkpoint's optimizer and schedule state are loaded: put back this run's group settings and base
    lr (an older checkpoint's optimizer state carries its own), and set the lr of the next step to
    lr × lr_factor(step) of this run's schedule (the checkpoint's saved last lr belongs to its schedule)."""
    groups = scheduler.optimizer.param_groups
    for group, kept in zip(groups, settings):
        group.update(kept)
    scheduler.base_lrs = [g["initial_lr"] for g in groups]
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports until the next step


def changed_at_resume(saved: dict, now: dict) -> list[str]:
    """`key=new (checkpoint: old)` for each optimizer/schedule setting of the config dict `now` that differs from
    the checkpoint's config dict `saved` (train.max_steps too where the decay follows it)."""
    old, new = saved.get("optim", {}), now["optim"]
    out = [f"optim.{k}={new[k]} (checkpoint: {old[k]})" for k in RESUMED_FROM_CONFIG if k in old and old[k] != new[k]]
    steps_old, steps_new = saved.get("train", {}).get("max_steps"), now["train"]["max_steps"]
    if new["decay_steps"] is None and new["schedule"] != "constant" and steps_old not in (None, steps_new):
        out.append(f"train.max_steps={steps_new} (checkpoint: {steps_old}; the decay ends there)")
    return out
