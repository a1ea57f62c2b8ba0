"""Name a straggler: a rank whose own compute is consistently slower than the others' (a throttled or failing
CPU/GPU, a noisy neighbour), which in data parallelism makes every rank wait for it at each step.

What is timed is each rank's forward passes: in data parallelism (ZeRO 0-2) they hold no collective, so a slow rank
cannot hide behind the others' waiting, as it does in a whole step's time. (Where the forward pass has collectives
itself, tensor parallelism or ZeRO-3, the waiting evens the times out and a straggler shows less; a pipeline's
schedule is not timed.) On a GPU the time is taken with CUDA events, read at the log record, without a sync per
step. At each log record the ranks share their times (one all-reduce); a rank more than `train.straggler_ratio`
times the median of the others is named, once when it starts lagging and once when it is back.
"""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from megapile.runtime.peers import Peers


class StragglerWatch:
    def __init__(self, peers: Peers, rank: int, ratio: float, device: torch.device) -> None:
        self.peers, self.rank, self.ratio, self.device = peers, rank, ratio, device
        self.seconds = 0.0  # this window's forward time (CPU), or the events' (GPU), read at the record
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.lagging: set[int] = set()

    @contextmanager
    def timing(self) -> Iterator[None]:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.events.append((start, end))
        else:
            t = time.perf_counter()
            yield
            self.seconds += time.perf_counter() - t

    def check(self, first_step: int, last_step: int, message: Callable[[str], None]) -> float:
        """Share this window's times (a collective: every rank calls it at the same record); name the ranks that
        started or stopped lagging; return the largest ratio of a rank's time to the other ranks' median."""
        world = len(self.peers.peers)
        if self.events:  # done long ago (backward and the step came after); elapsed_time needs them complete
            self.events[-1][1].synchronize()
        mine = self.seconds + sum(s.elapsed_time(e) / 1000 for s, e in self.events)
        self.seconds, self.events = 0.0, []
        times = torch.zeros(world, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        times[self.rank] = mine
        dist.all_reduce(times)
        times = times.tolist()
        # Against the median of the *other* ranks: with two ranks the median of all would be their mean
        ratios = [t / m if (m := statistics.median(times[:r] + times[r + 1:])) > 0 else 1.0
                  for r, t in enumerate(times)]
        now = {r for r, x in enumerate(ratios) if x > self.ratio}
        for r in sorted(now - self.lagging):
            message(f"straggler: {self.peers.describe([r])} took {ratios[r]:.2f}× the other ranks' median forward time "
                    f"over steps {first_step}-{last_step} ({times[r]:.3f} s; "
                    f"train.straggler_ratio={self.ratio:g}): every rank waits for it at each step")
        for r in sorted(self.lagging - now):
            message(f"straggler: {self.peers.describe([r])} is back within train.straggler_ratio={self.ratio:g} of the "
                    f"others' median over steps {first_step}-{last_step} ({ratios[r]:.2f}×)")
        self.lagging = now
        return max(ratios)
