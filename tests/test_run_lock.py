"""One run per run directory (megapile/runtime/run_lock.py): a second run on a busy directory is refused with one line naming
the holder and touches nothing; a lock whose holder died is taken over, naming it."""
import json
import os
import re
import signal
import socket
import sys

import pytest
from harness import run_command, run_ranks, start_command, start_each_rank, start_ranks, wait_for
from train_helpers import TRAIN, read_metrics, small_run_overrides

from megapile.config import ConfigError
from megapile.runtime.distributed import DistEnv
from megapile.runtime.run_lock import LOCK_NAME, RunLock, take

ONE_RANK = DistEnv(0, 1, 0, "127.0.0.1", 29500, "single")
# Takes the lock in a child process and waits to be killed
HOLD = "import signal, sys; from megapile.runtime.run_lock import RunLock; RunLock(sys.argv[1]).acquire(); signal.pause()"


def _record(run_dir) -> dict:
    text = open(os.path.join(run_dir, LOCK_NAME)).read()
    return json.loads(text) if text.strip() else {}


def _holding_child(run_dir, logs):
    child = start_command([sys.executable, "-c", HOLD, str(run_dir)], logs, name="holder")
    wait_for(lambda: os.path.exists(os.path.join(run_dir, LOCK_NAME)) and _record(run_dir).get("pid") == child.pid,
             child, 60, "lock record")
    return child


def test_a_held_lock_refuses_a_second_holder_naming_the_first(tmp_path):
    run_dir = str(tmp_path / "run")
    first = RunLock(run_dir)
    assert first.acquire() is None  # a fresh directory: nothing to take over
    assert _record(run_dir)["host"] == socket.gethostname() and _record(run_dir)["pid"] == os.getpid()
    # flock conflicts between two open() of the file even in one process, and across processes
    with pytest.raises(ConfigError, match=rf"^run directory {re.escape(run_dir)} is in use by another run \(host "
                                          rf"{re.escape(socket.gethostname())}, pid {os.getpid()}, started "
                                          r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ; lock .*\.megapile\.lock\): "):
        RunLock(run_dir).acquire()
    other = run_command([sys.executable, "-c", "import sys; from megapile.runtime.run_lock import RunLock\n"
                         "try: RunLock(sys.argv[1]).acquire()\nexcept Exception as e: sys.exit(str(e))", run_dir],
                        tmp_path / "logs", timeout=60, check=False)
    assert other.returncode == 1 and f"in use by another run (host {socket.gethostname()}, pid {os.getpid()}," \
        in other.stderr, other.stderr
    first.release()
    assert _record(run_dir) == {}  # a clean release leaves no record ...
    with RunLock(run_dir):  # ... so the next holder takes it without reporting a takeover
        assert _record(run_dir)["pid"] == os.getpid()
    assert first.acquire() is None
    first.release()


def test_refusal_from_take_is_a_config_error(tmp_path):
    with _holding_child(tmp_path / "run", tmp_path / "logs") as child:  # killed on the way out
        with pytest.raises(ConfigError, match=rf"in use by another run \(host .*, pid {child.pid}, "):
            take(str(tmp_path / "run"), ONE_RANK)


def test_a_killed_holders_lock_is_taken_over_naming_it(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    with _holding_child(run_dir, tmp_path / "logs") as child:
        started = _record(run_dir)["started"]
        child.signal_group(signal.SIGKILL)  # no release: the record stays, the kernel drops the flock
        child.finish(timeout=60, check=False)
    lock = take(run_dir, ONE_RANK)
    try:
        assert lock is not None and _record(run_dir)["pid"] == os.getpid()
        out = capsys.readouterr().out
        assert out == (f"run directory {run_dir}: taking over the lock left by host {socket.gethostname()}, pid "
                       f"{child.pid}, started {started}: that run ended without releasing it\n")
    finally:
        lock.release()


def test_a_record_from_another_host_under_a_free_lock_is_taken_over(tmp_path):
    """The holder on another host whose NFS lock was lost, or a run killed there: flock is free, its record stays."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK_NAME).write_text(json.dumps({"host": "node17", "pid": 4242, "started": "2026-12-07T10:00:00Z"}))
    lock = RunLock(str(run_dir))
    assert lock.acquire().describe() == "host node17, pid 4242, started 2026-12-07T10:00:00Z"
    lock.release()
    assert lock.acquire() is None  # released cleanly: nothing left to report
    lock.release()


def _snapshot(directory) -> dict:
    """Every file under `directory` with its bytes and mtime; every folder by name."""
    found = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            found[os.path.relpath(os.path.join(root, name), directory)] = "dir"
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, directory)] = (f.read(), os.stat(path).st_mtime_ns)
    return found


@pytest.mark.slow
def test_a_second_run_on_a_busy_directory_exits_with_one_line_and_touches_nothing(tmp_path, preprocessed,
                                                                                   tokenizer_path):
    run_dir = str(tmp_path / "run")
    # More steps than it can reach: it is stopped by the test (SIGSTOP, then SIGTERM), never by finishing
    overrides = small_run_overrides(preprocessed, tokenizer_path, run_dir, train__max_steps=100000,
                                    checkpoint__every=2, train__eval_every=0)
    logs = tmp_path / "logs"
    with start_ranks("python", 1, [TRAIN] + overrides, logs) as first:  # killed on the way out if the test fails
        metrics = os.path.join(run_dir, "metrics.jsonl")
        # training, with a checkpoint written: everything a second run could damage is there
        wait_for(lambda: os.path.exists(os.path.join(run_dir, "checkpoints", "latest"))
                 and len(open(metrics).readlines()) >= 3, first, 180, "checkpoint and 3 logged steps")
        assert _record(run_dir)["pid"] == first.pid
        os.kill(first.pid, signal.SIGSTOP)  # holds the lock, writes nothing until SIGCONT
        wait_for(lambda: open(f"/proc/{first.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "T", first, 30,
                 "stopped state")
        before = _snapshot(run_dir)

        # the same command again (a duplicate sbatch), to 4 steps: unrefused, it would resume and end at once
        second = run_ranks("python", 1, [TRAIN] + overrides + ["train.max_steps=4"], logs, timeout=300, check=False)
        assert second.returncode == 1, second.stderr[-2000:]
        lines = [line for line in second.stderr.splitlines() if line.strip() and "[WARNING]" not in line]
        assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr[-2000:]
        assert lines[0].startswith(f"megapile: error: run directory {run_dir} is in use by another run (host "
                                   f"{socket.gethostname()}, pid {first.pid}, started "), lines[0]
        assert _snapshot(run_dir) == before  # no file of the first run written, removed or rewound

        os.kill(first.pid, signal.SIGCONT)
        os.kill(first.pid, signal.SIGTERM)  # checkpoint and leave: exit 75
        assert first.finish(timeout=300, check=False).returncode == 75, first.describe()
    steps = [r["step"] for r in read_metrics(run_dir)]
    assert steps == list(range(1, len(steps) + 1))  # one uninterrupted log
    assert _record(run_dir) == {}  # released on its way out


@pytest.mark.slow
def test_every_rank_of_a_refused_run_exits_with_the_one_line(tmp_path, preprocessed, tokenizer_path):
    """Rank 0 decides and tells the others: no rank waits for one that gave up."""
    run_dir = str(tmp_path / "run")
    with RunLock(run_dir):  # each rank a process of its own, as SLURM starts them: each rank's stderr apart
        ranks = start_each_rank(2, [TRAIN] + small_run_overrides(preprocessed, tokenizer_path, run_dir),
                                tmp_path / "logs")
        results = [rank.finish(timeout=300, check=False) for rank in ranks]
    for result in results:
        err = result.stderr
        lines = [line for line in err.splitlines() if line.strip() and "[WARNING]" not in line]
        assert result.returncode == 1 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
        assert lines[0].startswith(f"megapile: error: run directory {run_dir} is in use by another run (host "
                                   f"{socket.gethostname()}, pid {os.getpid()}, started "), lines[0]
    # nothing written: the checkpoint folder is only the one the writability check makes, empty
    assert sorted(os.listdir(run_dir)) == [LOCK_NAME, "checkpoints"] and not os.listdir(f"{run_dir}/checkpoints")
