"""One run per run directory: rank 0 holds an exclusive lock on RUN_DIR/.megapile.lock for the run's whole life.

Two runs on one directory (a duplicate sbatch, two users on runs/default) would delete each other's temporary
saves, prune each other's checkpoints and rewind each other's metrics.jsonl. The second one is refused instead,
with one line naming the holder, which the lock file records (host, pid, start time).

The lock is `fcntl.flock`, and flock is the truth: the kernel releases it when its holder dies, however it dies
(SIGKILL included), so a held flock means a live holder, and a free one means none, whatever the file says. The
record only names the holder. A holder that releases the lock empties the record first, so a record found under
a free lock is one a run left behind when it ended without releasing (killed, or on another host whose NFS lock
was lost): it is reported in one line and taken over.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
from dataclasses import asdict, dataclass
from typing import Optional

from megapile.config import ConfigError
from megapile.runtime.distributed import DistEnv

LOCK_NAME = ".megapile.lock"


@dataclass(frozen=True)
class Holder:
    """Who holds (or held) a run directory's lock, as its lock file records it."""

    host: str
    pid: int
    started: str  # ISO 8601, UTC

    @classmethod
    def this_process(cls) -> "Holder":
        now = datetime.datetime.now(datetime.timezone.utc)
        return cls(socket.gethostname(), os.getpid(), now.strftime("%Y-%m-%dT%H:%M:%SZ"))

    @classmethod
    def parse(cls, text: str) -> Optional["Holder"]:
        """The recorded holder, or None for an empty record (released) or one cut short by a crash."""
        try:
            record = json.loads(text)
            return cls(str(record["host"]), int(record["pid"]), str(record["started"]))
        except (ValueError, TypeError, KeyError):
            return None

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, started {self.started}"


class RunLock:
    """An exclusive lock on one run directory, held from `acquire` to `release` (or for a `with` block)."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_NAME)
        self._fd: Optional[int] = None
        self._holder = Holder.this_process()

    def acquire(self) -> Optional[Holder]:
        """Take the lock; return the holder it was taken over from, if a run left it without releasing. A
        directory another run holds raises ConfigError naming that run."""
        try:
            os.makedirs(self.run_dir, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"logging.run_dir: cannot create the lock file {self.path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            recorded = Holder.parse(_read(fd))
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                raise ConfigError(f"logging.run_dir: cannot lock {self.path}: {e.strerror or e}") from None
            holder = recorded.describe() if recorded else "its holder has not recorded itself yet"
            raise ConfigError(
                f"run directory {self.run_dir} is in use by another run ({holder}; lock {self.path}): wait for "
                f"that run to end or stop it, or give this run another logging.run_dir") from None
        # Any record left under a free flock is a run that ended without releasing, even one naming a live pid on
        # this host: that process no longer holds the lock (the pid was reused, or it closed the file), so take it.
        left = Holder.parse(_read(fd))
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(asdict(self._holder)).encode() + b"\n", 0)
        except OSError as e:  # a full disk: one line, and the lock goes with the descriptor
            os.close(fd)
            raise ConfigError(f"logging.run_dir: cannot write the lock file {self.path}: {e.strerror or e}") from None
        self._fd = fd
        return left if left is not None and (left.host, left.pid) != (self._holder.host, self._holder.pid) else None

    def release(self) -> None:
        """Empty the record, then unlock: a record under a free lock then always means an unclean end."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing the only descriptor releases the flock

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def take(run_dir: str, env: DistEnv) -> Optional[RunLock]:
    """Rank 0 takes the run directory's lock and tells the others: a refusal is the same one-line ConfigError on
    every rank. A collective once the process group is up; returns the held lock on rank 0, None elsewhere."""
    import torch.distributed as dist  # lazy: the lock itself needs no torch

    lock, outcome = None, [None]
    if env.is_main:
        lock = RunLock(run_dir)
        try:
            left = lock.acquire()
            if left is not None:
                print(f"run directory {run_dir}: taking over the lock left by {left.describe()}: that run ended "
                      f"without releasing it", flush=True)
        except ConfigError as e:
            lock, outcome = None, [e]
    if env.world_size > 1:
        try:
            dist.broadcast_object_list(outcome, src=0)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
    if isinstance(outcome[0], ConfigError):
        raise outcome[0]
    return lock


def _read(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode(errors="replace")
