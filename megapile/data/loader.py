"""This rank's rows of each global batch, keyed on the global sample index, read one batch ahead.

The position in training is one integer, the global sample index. Micro-batch j of the global batch that
starts at sample `first` is, on data-parallel rank r of dp, rows [first + j*m*dp + r*m, +m) (m: the micro-batch
size), so any world size trains the same samples in the same order, and a resume or a change of the global
batch size goes on from the saved index.

While one global batch trains, a background thread reads the next one (`first + global_batch`): on a new epoch
that includes building the epoch's shuffled index. The read-ahead is used only if the next request asks for
that very sample index; any other request (evaluation, a resume, a rollback) is read directly. At most one
thread reads the stream at a time: a request waits for the read-ahead in flight before it reads itself.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator, Optional

import numpy as np
import torch


class Batches:
    def __init__(self, stream, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int,
                 prefetch: bool = True):
        """`stream`: megapile.data.samples stream, `get_batch(start, count)` -> (count, seq_len + 1) int64."""
        self.stream = stream
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="megapile-batches") if prefetch else None
        self._ahead: Optional[tuple[int, Future]] = None  # (first sample, its rows being read)

    def rows(self, first: int) -> list[np.ndarray]:
        """This rank's micro-batches (each (m, seq_len + 1)) of the global batch that starts at sample `first`."""
        per_micro = self.micro_batch * self.dp_size
        return [self.stream.get_batch(first + j * per_micro + self.dp_rank * self.micro_batch, self.micro_batch)
                for j in range(self.global_batch // per_micro)]

    def micro_batches(self, first: int, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(inputs, targets) of each micro-batch, on `device`; starts reading the next global batch."""
        rows = self._take(first)
        if self._pool is not None:
            self._ahead = (first + self.global_batch, self._pool.submit(self.rows, first + self.global_batch))
        for r in rows:
            block = to_device(torch.from_numpy(r), device)  # one copy of the whole block, sliced on the device
            yield block[:, :-1], block[:, 1:]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool, self._ahead = None, None

    def _take(self, first: int) -> list[np.ndarray]:
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            key, future = ahead
            if key == first:
                return future.result()  # a read error surfaces here, at the step that needs the rows
            future.exception()  # not the rows asked for: wait, so only one thread reads the stream
        return self.rows(first)


def to_device(block: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A contiguous (m, seq_len + 1) block on `device`. On a GPU it is pinned first, so the copy runs
    asynchronously; its slices (inputs, targets) are not contiguous, and copying them would be staged through
    pageable memory, so only the whole block is copied."""
    if device.type != "cuda":
        return block
    return block.pin_memory().to(device, non_blocking=True)
