"""SIGTERM/SIGUSR1 mean "checkpoint and leave": the trainer finishes its step, saves, and exits with
EXIT_CHECKPOINTED so a batch script can requeue the job (SLURM sends SIGUSR1 before the time limit,
and SIGTERM on preemption)."""
from __future__ import annotations

import signal
import sys

# EX_TEMPFAIL from sysexits.h: "temporary failure; the user is invited to retry".
EXIT_CHECKPOINTED = 75

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopFlag:
    """Set by a stop signal; read once per step. Further signals (e.g. during the save) only log."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is None:
            self.signal_name = name
            print(f"megapile: {name} received: finishing this step, then saving a checkpoint", file=sys.stderr,
                  flush=True)
        else:
            print(f"megapile: {name} received again: still saving, not interrupting", file=sys.stderr, flush=True)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None
