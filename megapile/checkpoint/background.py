"""Asynchronous checkpoints (`checkpoint.async: true`): training goes on while the files are written.

At a save step every rank takes its slices of the fp32 masters and Adam moments, with its RNG streams and
megapile's state (`collective.stage`, collective, on the training thread), into host buffers kept from one save
to the next (`fragments.Buffers`: 12 bytes per parameter element the rank holds). A background thread copies the
slices into the buffers (from a GPU the training thread copies them at once, into pinned memory), then writes,
fsyncs and checksums this rank's files (`collective.write`, no collective). The copy overlaps the next step's
forward and backward, which do not touch the masters and moments; the optimizer's step waits for it (a step
pre-hook on the torch optimizer under DeepSpeed's, the only place they change). The commit (manifest, rename,
`latest`: `collective.commit`) is a collective on the training thread at the first step after every rank's
write is done: one small all-reduce per step asks (`ready`), in the same order as training's own collectives,
never from the thread; pruning old checkpoints then runs on a thread of rank 0. Until the commit the folder is
`global_stepN.tmp/`, which a resume ignores, so a kill at any instant (snapshot, write, between write and commit,
commit) leaves the newest committed checkpoint loadable, as a synchronous save does.

At most one save is in flight: a save step that finds the previous one still writing waits for it (logged and
counted), and so do the last step, a stop signal and a loss-spike rollback (megapile/checkpoint/manager.py).

A thread, not a writer process: the buffers are then plain memory (no shared-memory segment to size, leak or
clean after a kill) and a failed write is an exception in this process. bench/checkpoint_io.py measures both:
on a 2-core CPU the thread slows the steps beside it 1.2-1.9x (its Python work contends for the interpreter
lock), a process does not; a process writer is the next step (docs/performance.md, checkpoint I/O).
"""
from __future__ import annotations

import sys
import threading
import time
from typing import Optional

import torch

from megapile.checkpoint import collective, fragments, prune
from megapile.parallel.collectives import any_rank

SNAPSHOT_BYTES_PER_ELEMENT = 12  # the fp32 master and Adam's two moments, in host memory


class Background:
    """This rank's in-flight asynchronous save, if any, and the buffers its snapshots reuse."""

    def __init__(self, world_size: int, optimizer) -> None:
        """`optimizer`: the engine's (DeepSpeed's) optimizer; its torch optimizer's step waits for a deferred copy."""
        self.world_size = world_size
        self.buffers = fragments.Buffers(defer_cpu=True)
        self._copied = threading.Event()  # the in-flight save's slices are in the buffers
        self._copied.set()
        torch_optimizer(optimizer).register_step_pre_hook(lambda *_: self.wait_copied())
        self.staged: Optional[collective.Staged] = None
        self.step = 0  # the in-flight save's step
        self.snapshot_seconds = 0.0  # how long its snapshot blocked training
        self._thread: Optional[threading.Thread] = None
        self._result: Optional[tuple] = None  # collective.write's (entries, error), once done
        self._pruner: Optional[threading.Thread] = None  # rank 0's: deleting checkpoints beyond checkpoint.keep_last
        self.waits = 0  # save steps (and ends) that found a save still writing
        self.waited_seconds = 0.0

    @property
    def in_flight(self) -> bool:
        return self.staged is not None

    def start(self, staged: collective.Staged, step: int, snapshot_seconds: float) -> None:
        """Write `staged` (made with `self.buffers`) on a background thread."""
        assert self.staged is None, "one asynchronous save at a time"
        self.join_pruner()
        self.staged, self.step, self.snapshot_seconds, self._result = staged, step, snapshot_seconds, None
        self._copied.clear()
        self._thread = threading.Thread(target=self._write, name=f"megapile-save-{staged.tag}", daemon=True)
        self._thread.start()  # daemon: a process that ends abandons the write; the .tmp folder is never resumed

    def _write(self) -> None:
        try:
            self.buffers.fill()
        finally:
            self._copied.set()  # a failed copy is the write's error below; the step must not wait forever
        self._result = collective.write(self.staged)

    def wait_copied(self) -> None:
        """Before the optimizer changes the masters and moments: the in-flight snapshot is copied."""
        self._copied.wait()

    def ready(self) -> bool:
        """Collective: every rank's write of the in-flight save has returned (one all-reduce)."""
        unfinished = self._thread is not None and self._thread.is_alive()
        return not any_rank([unfinished], self.world_size)[0]

    def wait(self) -> Optional[float]:
        """Block until this rank's write has returned: the seconds it took, counted as a wait; None when it had."""
        if self._thread is None or not self._thread.is_alive():
            return None
        start = time.perf_counter()
        self._thread.join()
        waited = time.perf_counter() - start
        self.waits += 1
        self.waited_seconds += waited
        return waited

    def prune(self, directory: str, cfg) -> None:
        """Rank 0, after a commit: delete the checkpoints beyond checkpoint.keep_last on a thread (gigabytes of
        rmtree). A kill midway leaves an older checkpoint partly deleted, which a resume's manifest check skips;
        the newest, just committed, is never among them."""
        self.join_pruner()
        self._pruner = threading.Thread(target=_prune, args=(directory, cfg), name="megapile-prune", daemon=True)
        self._pruner.start()

    def join_pruner(self) -> None:
        if self._pruner is not None:
            self._pruner.join()
            self._pruner = None

    def take(self) -> tuple[collective.Staged, tuple]:
        """The finished save to commit, and its write's result; nothing is in flight afterwards."""
        assert self._thread is not None and not self._thread.is_alive()
        staged, result = self.staged, self._result
        self.staged, self._thread, self._result = None, None, None
        return staged, result


def torch_optimizer(optimizer):
    """The torch optimizer that DeepSpeed's (ZeRO's, bf16's) wraps, whose step alone changes the fp32 masters and
    Adam's moments; the optimizer itself when DeepSpeed steps a torch optimizer directly (ZeRO-0, fp32)."""
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"checkpoint.async: no torch optimizer under {type(optimizer).__name__}")
    return optimizer


def _prune(directory: str, cfg) -> None:
    try:
        prune(directory, cfg)
    except OSError as e:
        print(f"warning: pruning old checkpoints in {directory} failed: {e}", file=sys.stderr)


def refusal(snapshot_bytes: int, ranks_on_host: int, available_bytes: int) -> Optional[str]:
    """Why checkpoint.async cannot run on this host, or None: every rank of the host keeps a snapshot of
    `snapshot_bytes` in host memory, and together they must leave a quarter of what is available free (for the
    page cache the writes go through, and the data loaders)."""
    needed = snapshot_bytes * ranks_on_host
    if needed <= 0.75 * available_bytes:
        return None
    return (f"checkpoint.async: the snapshot of the fp32 masters and Adam moments takes {snapshot_bytes / 1e9:.2f} GB "
            f"of host memory per rank ({SNAPSHOT_BYTES_PER_ELEMENT} bytes per parameter element a rank writes) × "
            f"{ranks_on_host} ranks on this host = {needed / 1e9:.2f} GB, more than 3/4 of the "
            f"{available_bytes / 1e9:.2f} GB available; set checkpoint.async=false (megapile plan shows the "
            "figure per layout)")
