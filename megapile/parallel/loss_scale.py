"""fp16's dynamic loss scale, the same questions asked of every DeepSpeed optimizer that keeps one.

DeepSpeed 0.19.8 keeps it in two shapes: ZeRO 1-3 in `optimizer.loss_scaler` (a `DynamicLossScaler` under fp16,
a static `LossScaler` of 1 under fp32 and bf16), the ZeRO-0 fp16/bf16 optimizers in `optimizer.loss_scale_config`.
The scale starts at 2**fp16.initial_scale_power, halves on each overflowing step (whose update is skipped, by
design: a scale too high for the gradients, not bad data) and doubles after fp16.loss_scale_window clean steps.
At fp16.min_loss_scale ZeRO 1-3 raise a plain Exception; ZeRO-0 stays there and skips every step.
"""
from __future__ import annotations

from typing import Any, Optional

# What changes as training goes on; the rest (window, minimum, hysteresis) is configuration, which a resume takes
# from the run's own config so that a changed fp16 section takes effect.
STATE = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")

_AT_MINIMUM = "Current loss scale already at minimum"  # DeepSpeed's message, loss_scaler.py


def scaler(engine) -> Optional[Any]:
    """The engine's loss scaler, whichever shape; None where its optimizer has none (fp32 ZeRO-0)."""
    optimizer = engine.optimizer
    return getattr(optimizer, "loss_scaler", None) or getattr(optimizer, "loss_scale_config", None)


def is_dynamic(state: Any) -> bool:
    """Whether a scaler, or the dict of one saved in a checkpoint, is fp16's dynamic one."""
    get = state.get if isinstance(state, dict) else lambda key, default: getattr(state, key, default)
    return bool(get("dynamic", False) or get("dynamic_loss_scale", False))


def minimum(scale: Any) -> float:
    return float(getattr(scale, "min_scale", None) or getattr(scale, "min_loss_scale", None) or 0.0)


def at_minimum(error: Exception) -> bool:
    """Whether `error` is DeepSpeed's overflow at fp16.min_loss_scale (a plain Exception, told by its text)."""
    return type(error) is Exception and _AT_MINIMUM in str(error)


def restore(engine, saved: dict[str, Any]) -> bool:
    """Go on with a saved dynamic scale where this engine's is dynamic too (never below this run's minimum);
    False, leaving the configured initial scale, otherwise."""
    current = scaler(engine)
    if current is None or not is_dynamic(current) or not is_dynamic(saved):
        return False
    for key in STATE:
        if key in saved and hasattr(current, key):
            setattr(current, key, saved[key])
    current.cur_scale = max(float(current.cur_scale), minimum(current))
    return True


def stuck_at_minimum(scale: Any, before: float) -> bool:
    """An overflow at the minimum, where the optimizer does not raise itself (ZeRO-0: it would skip every step on)."""
    return not hasattr(scale, "raise_error_at_min_scale") and before <= minimum(scale)
