"""ZeRO-0 in fp32: give DeepSpeed's plain-optimizer step what its ZeRO and mixed-precision optimizers do.

Without ZeRO and without bf16/fp16, DeepSpeed steps our torch optimizer itself: it applies whatever the
gradients hold (one NaN reaches every weight) and reports no gradient norm. `guard_plain_step` wraps that
optimizer's step: the global gradient norm, clipping by it, and no update at all when it is not finite.
Setting `overflow` on the optimizer makes DeepSpeed count the skip (`engine.skipped_steps`) and hold the LR
schedule, as it does for an fp16 overflow; `_global_grad_norm` is what `engine.get_global_grad_norm()`
returns. bf16/fp16 (DeepSpeed's BF16/FP16 optimizers) and ZeRO >= 1 do all of this themselves.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch


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
    import torch.distributed as dist

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
