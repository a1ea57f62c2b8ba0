"""Loss spikes: skip the step, and when that is not enough, roll back and step over the data that caused them.

A step's loss is judged before its update: after the forward passes of all its micro-batches, the mean loss
over every rank (one all-reduce, so every rank holds the same number and takes the same decision) is compared
with the last `train.spike.window` accepted steps. More than `z_threshold` standard deviations above their mean
is a spike: the step's last backward runs on a NaN loss, so every engine skips the update by the path that
skips a non-finite step (DeepSpeed counts it, the LR schedule holds, ZeRO-3 is repaired). A gradient norm is
known only after the update (clipped by optim.grad_clip); a norm that many deviations above its window is
logged and counts toward a rollback, but cannot be skipped.

`max_skips` spikes within a window, or `patience` in a row, ask for a rollback: the run reloads the newest
checkpoint at least `rollback_steps` before the first of them and goes on with the global samples of their
range never trained (megapile/checkpoint/manager.py `roll_back`; the range joins the data state that every
later checkpoint saves). The detector's window is saved in every checkpoint too, so a resumed run decides
exactly as an uninterrupted one.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from megapile.config import SpikeConfig


@dataclass(frozen=True)
class Verdict:
    spike: bool
    loss: float  # the step's mean loss over all ranks
    z: float  # its z-score against the window (nan while the window is too short)


@dataclass(frozen=True)
class Rollback:
    first_step: int  # the first spike of the streak or window that asks for the rollback
    samples: tuple[int, int]  # global samples [start, end) of the spike steps, first to last
    reason: str


class SpikeDetector:
    """The window of accepted steps and the recent spikes; identical on every rank (fed all-reduced values)."""

    def __init__(self, cfg: SpikeConfig):
        self.cfg = cfg
        self.reset()

    def reset(self) -> None:
        self.losses: deque[float] = deque(maxlen=self.cfg.window)
        self.norms: deque[float] = deque(maxlen=self.cfg.window)
        self.events: list[tuple[int, int, int]] = []  # (step, first sample, end sample) of recent spikes
        self.streak = 0  # spikes in a row

    def judge(self, loss: float) -> Verdict:
        """Whether a step with this mean loss is a spike (to be skipped); call before its update."""
        z = _z_score(loss, self.losses, self.cfg.min_steps)
        return Verdict(math.isfinite(loss) and z > self.cfg.z_threshold, loss, z)

    def norm_z(self, norm: Optional[float]) -> float:
        return math.nan if norm is None else _z_score(norm, self.norms, self.cfg.min_steps)

    def observe(self, step: int, samples: tuple[int, int], verdict: Verdict, norm: Optional[float]) -> Optional[Rollback]:
        """After step `step` (global samples `samples`): add it to the window, or count it as a spike (skipped by
        its loss, or a gradient-norm spike); a Rollback when the spikes are too many."""
        norm_spike = not verdict.spike and self.norm_z(norm) > self.cfg.z_threshold
        if not (verdict.spike or norm_spike):
            self.streak = 0
            # A non-finite step (skipped by the non-finite path) says nothing about the loss's range, and one NaN
            # in the window would make every later z-score NaN: no spike could be seen for `window` steps.
            if math.isfinite(verdict.loss):
                self.losses.append(verdict.loss)
            if norm is not None and math.isfinite(norm):
                self.norms.append(norm)
            return None
        self.streak += 1
        self.events = [e for e in self.events if e[0] > step - self.cfg.window] + [(step, *samples)]
        if self.streak >= self.cfg.patience:
            why = f"{self.streak} spikes in a row (train.spike.patience={self.cfg.patience})"
            events = self.events[-self.streak:]
        elif len(self.events) >= self.cfg.max_skips:
            why = (f"{len(self.events)} spikes within {self.cfg.window} steps "
                   f"(train.spike.max_skips={self.cfg.max_skips})")
            events = self.events
        else:
            return None
        return Rollback(events[0][0], (events[0][1], events[-1][2]), why)

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "norms": list(self.norms), "events": [list(e) for e in self.events],
                "streak": self.streak}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Checkpoints written before non-finite steps were kept out of the window may hold a NaN: dropped here.
        self.losses = deque(_finite(state["losses"]), maxlen=self.cfg.window)
        self.norms = deque(_finite(state["norms"]), maxlen=self.cfg.window)
        self.events = [tuple(e) for e in state["events"]]
        self.streak = int(state["streak"])


def _finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def _z_score(value: float, window: deque, min_steps: int) -> float:
    """How many standard deviations `value` lies above the window's mean (nan while it holds < min_steps)."""
    n = len(window)
    if n < min_steps or not math.isfinite(value):
        return math.nan
    mean = math.fsum(window) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in window) / n)
    # A nearly flat window (a plateau, a constant norm) would make any tiny rise a spike: the deviation is at
    # least 1 % of the mean, so z > 6 asks for at least a 6 % rise there.
    return (value - mean) / max(std, 0.01 * abs(mean), 1e-12)


def merge_ranges(*lists) -> list[list[int]]:
    """The union of [start, end) sample ranges, sorted, overlapping ones joined."""
    out: list[list[int]] = []
    for start, end in sorted((int(a), int(b)) for ranges in lists for a, b in ranges):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return out


def first_sample_after_skips(first: int, global_batch: int, skip: list[list[int]]) -> int:
    """Where the global batch that would start at `first` starts instead: after every skipped range it overlaps
    (sorted ranges; a batch is never split, so with another batch size than the one that recorded a range a few
    samples before it are stepped over too)."""
    for start, end in skip:
        if first < end and first + global_batch > start:
            first = end
    return first


class PipelineJudge:
    """The judge inside a pipeline's loss function, which DeepSpeed calls on the last stage once per micro-batch:
    at the step's last micro-batch the stage's data-parallel ranks agree on the step's mean loss (one all-reduce)
    and a spike turns that micro-batch's loss into NaN. `share` then gives every stage the verdict."""

    def __init__(self, detector: SpikeDetector, loss_fn, micro_batches: int, group, source_rank: int):
        self.detector, self.loss_fn, self.micro_batches = detector, loss_fn, micro_batches
        self.group, self.source_rank = group, source_rank  # this stage's data-parallel group; a last-stage rank
        self.losses: list[torch.Tensor] = []
        self.verdict: Optional[Verdict] = None

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = self.loss_fn(logits, targets)
        if not torch.is_grad_enabled():  # evaluation
            return loss
        self.losses.append(loss.detach().float())
        if len(self.losses) < self.micro_batches:
            return loss
        mean = torch.stack(self.losses).mean()
        self.losses = []
        dist.all_reduce(mean, group=self.group)
        self.verdict = self.detector.judge(float(mean) / dist.get_world_size(self.group))
        return loss * float("nan") if self.verdict.spike else loss

    def share(self) -> Verdict:
        """The last stage's verdict on every rank (after `train_batch`)."""
        box = [self.verdict]
        dist.broadcast_object_list(box, src=self.source_rank)
        self.verdict = None
        return box[0]
