"""A heartbeat outside the training collectives: a rank whose host died or whose network vanished is named
within train.heartbeat_timeout_s, not after train.collective_timeout_s of every rank waiting.

Each rank's thread adds 1 to its own counter in the launcher's store (the TCPStore every launcher starts at
MASTER_ADDR:MASTER_PORT) every `timeout / 4` seconds, over a connection of its own whose operations time out after
`timeout`. Rank 0 watches: a counter that has not moved for `timeout` seconds (by rank 0's clock) names that rank,
and rank 0 writes the verdict to the store for every other rank to read on its next beat. A rank that cannot reach
the store for `timeout` names the store's host. Either way the rank prints one line and leaves at once with exit
code 1 (its main thread is stuck in a collective that only the collective timeout would end). A rank busy for a
long time (a big checkpoint save, a slow first compile) still beats: the thread does not wait on training.

A rank that finishes marks itself done first, so that ranks ending at different times are not taken for dead.
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import threading
import time
from typing import Callable, Optional

from megapile.runtime.peers import Peers
from megapile.runtime.process_exit import say_error

EXIT_PEER_LOST = 1  # like any failed rank: a launcher or SLURM sees a failure, and the same command resumes


class Reporter:
    """One error line per process, whichever thread sees the failure first; then the process leaves."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reported = False

    def claim(self) -> bool:
        with self._lock:
            first, self.reported = not self.reported, True
            return first


class Heartbeat:
    def __init__(self, peers: Peers, rank: int, master_addr: str, master_port: int, timeout_s: float,
                 reporter: Reporter, namespace: str = "0", leave: Optional[Callable[[str], None]] = None) -> None:
        self.peers, self.rank, self.timeout_s = peers, rank, timeout_s
        self.where = f"{master_addr}:{master_port}"
        self.master = (master_addr, master_port)
        self.reporter = reporter
        self.prefix = f"megapile/heartbeat/{namespace}"
        self.step = 0  # the training step now running, for the error line (set by the loop)
        self.leave = leave or _print_and_exit
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def interval_s(self) -> float:
        return self.timeout_s / 4

    def start(self) -> "Heartbeat":
        import torch.distributed as dist  # lazy: torch, as in megapile/runtime/distributed.py

        # A connection of our own: its timeout is the heartbeat's, and it never waits behind the process group's
        self.store = dist.TCPStore(*self.master, is_master=False, wait_for_workers=False,
                                   timeout=datetime.timedelta(seconds=self.timeout_s))
        self.store.add(self._beat(self.rank), 1)
        self._thread = threading.Thread(target=self._run, name="megapile-heartbeat", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """This rank is finishing: say so (the watcher stops counting it), then end the thread."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=self.interval_s + self.timeout_s)
        try:
            self.store.set(self._done(self.rank), "1")
        except RuntimeError:
            pass  # the store's host has already finished: nobody is watching
        self._thread = None

    # -- the thread ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        world = len(self.peers.peers)
        last = {r: (0, time.monotonic()) for r in range(world)}  # rank -> (counter, when it last moved)
        while not self._stop.wait(self.interval_s):
            try:
                self.store.add(self._beat(self.rank), 1)
                if self.rank == 0:
                    silent = self._silent(last)
                    if silent:
                        return self._fail_silent(silent)
                elif self.store.check([self._verdict()]):
                    verdict = json.loads(self.store.get(self._verdict()))
                    return self._fail(self._silent_line(verdict["ranks"], verdict["step"]))
            except RuntimeError as e:  # the store's connection: reset, refused or timed out
                if self._stop.is_set():
                    return
                return self._fail(f"megapile: error: the launcher's store at {self.where} on "
                                  f"{self.peers.describe([0])} stopped answering (its connection closed, or no reply "
                                  f"within train.heartbeat_timeout_s={self.timeout_s:g} s) at step {self.step}: that "
                                  f"host died or is unreachable from here; every rank stops; restart the job to resume "
                                  f"from the last checkpoint ({' '.join(str(e).split())[:160]})")

    def _silent(self, last: dict[int, tuple[int, float]]) -> list[int]:
        now = time.monotonic()
        others = [r for r in last if r != self.rank]
        silent = []
        for r in others:
            if self.store.check([self._done(r)]):
                continue
            count = int(self.store.add(self._beat(r), 0))
            if count != last[r][0]:
                last[r] = (count, now)
            elif now - last[r][1] > self.timeout_s:
                silent.append(r)
        return silent

    def _fail_silent(self, ranks: list[int]) -> None:
        line = self._silent_line(ranks, self.step)
        try:  # the others read it on their next beat, and name the same ranks
            self.store.set(self._verdict(), json.dumps({"ranks": ranks, "step": self.step}))
            # Rank 0 may hold the store: wait (bounded) for the others to read the verdict before leaving
            deadline = time.monotonic() + 2 * self.interval_s
            while time.monotonic() < deadline and not self._stop.is_set():
                time.sleep(self.interval_s / 10)
        except RuntimeError:
            pass
        self._fail(line)

    def _silent_line(self, ranks: list[int], step: int) -> str:
        return (f"megapile: error: {self.peers.describe(ranks)} stopped responding at step {step}: no heartbeat for "
                f"{self.timeout_s:g} s (train.heartbeat_timeout_s; its host died, hung or lost its network); every "
                f"rank stops; restart the job to resume from the last checkpoint")

    def _fail(self, line: str) -> None:
        if self.reporter.claim():
            self.leave(line)

    def _beat(self, rank: int) -> str:
        return f"{self.prefix}/beat/{rank}"

    def _done(self, rank: int) -> str:
        return f"{self.prefix}/done/{rank}"

    def _verdict(self) -> str:
        return f"{self.prefix}/verdict"


def _print_and_exit(line: str) -> None:
    """Not process_exit.exit_now: MPI_Finalize may wait for the lost rank; the main thread is stuck in a collective."""
    say_error(line)
    sys.stdout.flush()
    os._exit(EXIT_PEER_LOST)


def namespace(environ) -> str:
    """Keys of one start of the job: torchrun keeps its store over restarts, so each attempt has its own."""
    return environ.get("TORCHELASTIC_RESTART_COUNT", "0")


def start(peers: Peers, rank: int, master_addr: str, master_port: int, timeout_s: float,
          reporter: Reporter) -> Optional[Heartbeat]:
    """A started heartbeat for a world of more than one rank; None for one rank."""
    if len(peers.peers) == 1:
        return None
    return Heartbeat(peers, rank, master_addr, master_port, timeout_s, reporter, namespace(os.environ)).start()
