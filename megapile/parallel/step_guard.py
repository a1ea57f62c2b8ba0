"""The step guard: on every engine and in every precision a step computes the global gradient norm, clips by
it, and skips the update when it is not finite (DeepSpeed counts the skip in `engine.skipped_steps` and holds
the LR schedule). `parallelize` applies it the same way for every layout.

DeepSpeed's ZeRO (stage >= 1) and bf16/fp16 optimizers do all of this themselves. Without ZeRO and without
bf16/fp16, DeepSpeed steps our torch optimizer itself: it applies whatever the gradients hold (one NaN reaches
every weight) and reports no gradient norm. `guard_plain_step` wraps that optimizer's step with the norm,
clipping and skip; setting `overflow` on the optimizer is how DeepSpeed learns of a skip (as for an fp16
overflow), and `_global_grad_norm` is what `engine.get_global_grad_norm()` returns. `after_skipped_step` repairs
what a skipped ZeRO-3 step leaves behind.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.distributed as dist


def needs_guard(ds_config: dict[str, Any]) -> bool:
    """True when DeepSpeed will step our torch optimizer unwrapped: ZeRO-0 without bf16/fp16."""
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    mixed = any(ds_config.get(k, {}).get("enabled", False) for k in ("bf16", "fp16"))
    return stage == 0 and not mixed


def without_clipping(ds_config: dict[str, Any]) -> dict[str, Any]:
    """The engine config for a guarded optimizer: the guard clips by the norm it computes anyway."""
    return {**ds_config, "gradient_clipping": 0.0}


def guard_plain_step(optimizer: torch.optim.Optimizer, max_norm: float, device: torch.device,
                     group: Optional[object] = None) -> None:
    """Wrap `optimizer.step` (see the module docstring). `group`: the ranks whose gradients together make the
    model, whose squared norms are summed: a pipeline's stages; None when every rank holds all of them (data
    parallel replicas hold the same gradients once DeepSpeed has all-reduced them). A weight that a pipeline
    ties across stages counts once: DeepSpeed marks its other copies `ds_pipe_replicated`."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    owned = [p for p in params if not getattr(p, "ds_pipe_replicated", False)]
    step = optimizer.step

    def guarded_step(*args, **kwargs):
        squares = [p.grad.detach().float().pow(2).sum() for p in owned if p.grad is not None]
        total = torch.stack(squares).sum() if squares else torch.zeros((), device=device)
        if group is not None:
            dist.all_reduce(total, group=group)
        norm = float(total.sqrt())  # one host read per step, as DeepSpeed's own norm check
        optimizer._global_grad_norm = norm
        optimizer.overflow = not math.isfinite(norm)
        if optimizer.overflow:
            return None
        coef = max_norm / (norm + 1e-6)  # DeepSpeed's and torch's clipping rule
        if max_norm > 0 and coef < 1:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(coef)
        return step(*args, **kwargs)

    optimizer.step = guarded_step


def after_skipped_step(engine) -> None:
    """Put ZeRO-3 back the way a completed step leaves it. On a non-finite gradient DeepSpeed's stage-3 step
    partitions every parameter and returns early, before re-gathering its persistent ones (the small
    parameters it keeps whole on every rank); the next step's recorded fetch order then no longer matches
    and DeepSpeed aborts ("tracing error") whenever that order was recorded with them whole, e.g. after a resume."""
    optimizer = engine.optimizer
    if engine.zero_optimization_stage() == 3 and getattr(optimizer, "persistent_parameters", None):
        optimizer.persistent_parameters[0].all_gather(optimizer.persistent_parameters)
