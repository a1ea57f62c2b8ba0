"""A flag that every rank agrees on without stalling the step loop: the stop request (a signal reaches one rank,
or the ranks at slightly different steps).

Agreeing at once would make each step wait for an all-reduce and read its result on the host, which on a GPU
empties the queue of kernels before the next step can be queued. Instead the all-reduce of step N's flag is
started after step N and read after step N+1 has been queued: the host then waits only for step N to finish,
while step N+1 runs. Every rank reads the same value at the same step, so they all stop together, one step
after the flag was raised. One rank needs no agreement and is answered at once.

On CUDA the flag is written by a kernel (no host-to-device copy), reduced by NCCL on its stream, copied into
pinned host memory after it, and an event marks that point; reading it waits for the event alone. On the CPU
(gloo) the reduction runs in gloo's threads and reading it waits for that.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


class LaggedFlag:
    def __init__(self, world_size: int, device: torch.device):
        self.world_size = world_size
        self.device = device
        self._cuda = device.type == "cuda"
        self._pending: Optional[tuple] = None  # (flag tensor, work, CUDA event or None) of the last flag posted
        # pinned, so the copy does not wait for the stream; one flag is in flight at a time (exchange drains first)
        self._host = torch.empty(1).pin_memory() if self._cuda else None

    def exchange(self, flag: bool) -> bool:
        """Post this step's flag; return whether any rank raised the flag it posted at the previous call
        (False at the first). With one rank: this step's flag."""
        if self.world_size == 1:
            return flag
        previous = self.drain()
        self._post(flag)
        return previous

    def drain(self) -> bool:
        """Wait for the flag in flight, if any, and return whether any rank raised it. Call before the loop
        ends, so no collective is left outstanding on the group."""
        if self._pending is None:
            return False
        value, work, event = self._pending
        self._pending = None
        if self._cuda:
            event.synchronize()  # the all-reduce and the copy are done; later kernels may still run
            return bool(self._host.item())
        work.wait()
        return bool(value.item())

    def _post(self, flag: bool) -> None:
        value = torch.full((1,), float(flag), device=self.device)  # a fill kernel on CUDA, no copy from the host
        work = dist.all_reduce(value, async_op=True)
        event = None
        if self._cuda:
            work.wait()  # NCCL: the current stream waits for the reduction; the host does not
            self._host.copy_(value, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        self._pending = (value, work, event)
