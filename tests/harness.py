"""The one way tests run processes: a script or module on N gloo ranks, or any command, in the foreground or the
background, with a free port, a bounded time, a test environment, and the full output kept in files.

    command(launcher, nproc, target)   argv for "python" (1 rank), "torchrun" or "deepspeed" ("ranks": below); target is
                                       [script, *args] or ["-m", module, *args]; a function runs as a
                                       script's __main__ (tests/test_parallel_tensor.py), or as ["-c", code]
                                       under python / start_each_rank (tests/test_distributed_env.py)
    run_ranks(launcher, nproc, target, logs)   run it to the end; raises with the output's tail if it fails
    run_command(argv, logs)            the same for a command line the test owns (launch/*.sh, mpirun, srun)
    start_ranks / start_command        the same in the background: a Background, polled with wait_for
    start_each_rank(nproc, target, logs)   one plain process per rank with RANK/WORLD_SIZE set, as SLURM and
                                       mpirun start them: each rank's own output
    wait_for(predicate, proc, timeout, what)   poll until a state holds, the process ends, or the bound passes

The launcher "ranks" starts each rank as a plain process with the rendezvous in its environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT): what torchrun hands its workers, without torchrun's own start-up (1.2 s of
every run on 2 cores). Tests of something other than the launcher use it; tests/test_launch.py and
tests/test_cluster/ run the launchers themselves.

`logs` is a folder under the test's tmp_path: every process writes NAME-K.out and NAME-K.err there (K the next free
number), so a failure's whole output is on disk and its tail in the assertion message. A test never sleeps to let
something happen: it polls for the state, bounded by a generous timeout that only a hang reaches.
"""
from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One thread per rank (2 shared cores), wandb offline and quiet: the same for every process a test starts
TEST_ENV = {"OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
TAIL_CHARS = 6000
POLL_S = 0.005  # fine enough to land inside a checkpoint save


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(env: dict | None = None) -> dict:
    """os.environ with TEST_ENV and `env` on top; a value of None removes that variable. This checkout comes first
    on PYTHONPATH: an installed (editable) megapile may be another checkout's, and a script run by path (a torchrun
    worker) does not have the working directory on sys.path."""
    merged = dict(os.environ, **TEST_ENV)
    merged["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    for key, value in (env or {}).items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = str(value)
    return merged


def command(launcher: str, nproc: int, target: list[str], port: int | None = None) -> list[str]:
    """The command line users type for `target` on `nproc` ranks on this machine."""
    if launcher == "python":
        assert nproc == 1, "plain python is one rank; use torchrun or deepspeed for more"
        return [sys.executable] + target
    port = str(port or free_port())
    if launcher == "torchrun":  # torchrun takes `-m module` itself
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", port,
                *target]
    if launcher == "deepspeed":  # the deepspeed launcher spells it --module
        target = ["--module", *target[1:]] if target[0] == "-m" else target
        return ["deepspeed", "--num_gpus", str(nproc), "--master_port", port, *target]
    raise ValueError(f"unknown launcher {launcher!r}")


class Background:
    """A started process (in its own session, so its whole tree can be signalled) and the files of its output."""

    def __init__(self, argv: list[str], logs, name: str, env: dict | None, cwd: str, stdin=None) -> None:
        self.argv = argv
        self.out_path, self.err_path = _log_paths(logs, name)
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(argv, cwd=cwd, env=process_env(env), stdout=out, stderr=err, stdin=stdin,
                                         text=True, start_new_session=True)
        self.pid = self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def stdout(self) -> str:
        return _read(self.out_path)

    def stderr(self) -> str:
        return _read(self.err_path)

    def describe(self) -> str:
        """The command, its state and the tail of both streams, for an assertion message."""
        state = "running" if self.proc.poll() is None else f"exited {self.proc.returncode}"
        return (f"{shlex.join(self.argv)}\n{state}; full output in {self.out_path} and {self.err_path}\n"
                f"--- stdout (tail)\n{self.stdout()[-TAIL_CHARS:]}\n--- stderr (tail)\n{self.stderr()[-TAIL_CHARS:]}")

    def signal_group(self, sig: int) -> None:
        """`sig` to the process and everything it started (a launcher and its ranks)."""
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass

    def finish(self, timeout: float, check: bool = True) -> subprocess.CompletedProcess:
        """Wait for the end, at most `timeout` s (then the whole tree is killed and the test fails)."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.signal_group(signal.SIGKILL)
            self.proc.wait()
            raise AssertionError(f"still running after {timeout:g} s, killed: {self.describe()}") from None
        if check and self.proc.returncode != 0:
            raise AssertionError(self.describe())
        if check and "terminate called" in self.stderr():  # a C++ teardown abort (tests/test_clean_exit.py), in any rank
            raise AssertionError(f"a process aborted at teardown: {self.describe()}")
        return subprocess.CompletedProcess(self.argv, self.proc.returncode, self.stdout(), self.stderr())

    def __enter__(self) -> "Background":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """Leave nothing running (after a failed test too): SIGKILL to the tree, SIGCONT so a stopped one dies."""
        if self.proc.poll() is None:
            self.signal_group(signal.SIGKILL)
            self.signal_group(signal.SIGCONT)
            self.proc.wait()


class RankGroup:
    """The processes of one job started by the launcher "ranks", used like a Background: when one rank fails the
    others are given GRACE_S to end on their own (they normally do within a second: their next collective fails),
    then killed, as torchrun kills a failed job's workers. Its output is every rank's, rank 0 first."""

    GRACE_S = 60.0

    def __init__(self, nproc: int, target: list[str], logs, env: dict | None, cwd: str, stdin=None) -> None:
        port = free_port()
        self.argv = [sys.executable] + target
        self.ranks = [Background(self.argv, logs, f"rank{rank}", {
            **(env or {}), "RANK": rank, "WORLD_SIZE": nproc, "LOCAL_RANK": rank, "LOCAL_WORLD_SIZE": nproc,
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}, cwd, stdin) for rank in range(nproc)]
        self.pid = self.ranks[0].pid
        self._failed_at: float | None = None

    def poll(self) -> int | None:
        codes = [r.poll() for r in self.ranks]
        failed = [c for c in codes if c not in (None, 0)]
        if failed and None in codes:
            self._failed_at = self._failed_at or time.monotonic()
            if time.monotonic() - self._failed_at < self.GRACE_S:
                return None
            self.stop()
            codes = [r.poll() for r in self.ranks]
        if None in codes:
            return None
        return next((c for c in codes if c != 0), 0)

    def stdout(self) -> str:
        return "".join(r.stdout() for r in self.ranks)

    def stderr(self) -> str:
        return "".join(r.stderr() for r in self.ranks)

    def describe(self) -> str:
        return "\n".join(f"--- rank {k}: {r.describe()}" for k, r in enumerate(self.ranks))

    def signal_group(self, sig: int) -> None:
        for r in self.ranks:
            r.signal_group(sig)

    def finish(self, timeout: float, check: bool = True) -> subprocess.CompletedProcess:
        deadline = time.monotonic() + timeout
        while (code := self.poll()) is None:
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"still running after {timeout:g} s, killed: {self.describe()}")
            time.sleep(0.05)
        if check and code != 0:
            raise AssertionError(self.describe())
        if check and "terminate called" in self.stderr():  # a C++ teardown abort (tests/test_clean_exit.py)
            raise AssertionError(f"a process aborted at teardown: {self.describe()}")
        return subprocess.CompletedProcess(self.argv, code, self.stdout(), self.stderr())

    def __enter__(self) -> "RankGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        for r in self.ranks:
            r.stop()


def start_command(argv: list[str], logs, name: str | None = None, env: dict | None = None, cwd: str = ROOT,
                  stdin=None) -> Background:
    return Background(argv, logs, name or os.path.basename(argv[0]), env, cwd, stdin)


def start_ranks(launcher: str, nproc: int, target: list[str], logs, env: dict | None = None,
                cwd: str = ROOT) -> Background | RankGroup:
    if launcher == "ranks":
        return RankGroup(nproc, target, logs, env, cwd)
    return start_command(command(launcher, nproc, target), logs, launcher, env, cwd)


def start_each_rank(nproc: int, target: list[str], logs, env: dict | None = None, cwd: str = ROOT,
                    stdin=None) -> list[Background]:
    """One `python target` per rank, the rendezvous in the environment (as SLURM or mpirun provide it), each
    watched on its own (a RankGroup watches them as one job)."""
    return RankGroup(nproc, target, logs, env, cwd, stdin).ranks


def run_command(argv: list[str], logs, timeout: float = 600, check: bool = True, name: str | None = None,
                env: dict | None = None, cwd: str = ROOT) -> subprocess.CompletedProcess:
    """Run to the end within `timeout` s; with `check`, a non-zero exit fails the test with the output's tail."""
    return start_command(argv, logs, name, env, cwd).finish(timeout, check)


def run_ranks(launcher: str, nproc: int, target: list[str], logs, timeout: float = 600, check: bool = True,
              env: dict | None = None, cwd: str = ROOT) -> subprocess.CompletedProcess:
    return start_ranks(launcher, nproc, target, logs, env, cwd).finish(timeout, check)


def wait_for(predicate: Callable[[], bool], proc: Background | None, timeout: float, what: str,
             exit_ok: bool = False, detail: Callable[[], str] | None = None, every: float = POLL_S) -> bool:
    """Poll `predicate` until it holds (True). If `proc` ends first: False with `exit_ok`, else the test fails with
    its output. Past `timeout` s the test fails: the bound is for a hang, never a guess of the machine's speed.
    `proc` None: something not started here (a SLURM job); `detail` then says what it was doing. `every`: the
    pause between polls, longer for a predicate that is itself a command (scontrol)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            if exit_ok:
                return False
            raise AssertionError(f"ended before {what}: {proc.describe()}")
        if time.monotonic() > deadline:
            state = proc.describe() if proc else detail() if detail else ""
            raise AssertionError(f"no {what} within {timeout:g} s: {state}")
        time.sleep(every)
    return True


def _log_paths(logs, name: str) -> tuple[str, str]:
    """NAME-K.out / NAME-K.err in `logs`, K the first number not yet used there."""
    logs = os.fspath(logs)
    os.makedirs(logs, exist_ok=True)
    k = 1
    while os.path.exists(os.path.join(logs, f"{name}-{k}.out")):
        k += 1
    return os.path.join(logs, f"{name}-{k}.out"), os.path.join(logs, f"{name}-{k}.err")


def _read(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()
