"""Kill campaign: SIGKILL a random rank of a 2-rank training job at random moments, restart the same command,
and check that the finished run equals an uninterrupted one bit for bit (per-step losses and final weights).
`kill_in_rollback` kills at each stage of a loss-spike rollback instead, through tests/faults/nan_train.py.

Used by tests/test_faults.py (K=4), tests/test_rollback_faults.py, tests/test_async_checkpoint.py (its Report) and bench/faults.py (K=50).
"""
from __future__ import annotations

import os
import random
import re
import subprocess
import time
from dataclasses import dataclass, field

import psutil
from harness import ROOT, run_ranks, start_ranks, wait_for
from train_helpers import TRAIN, run_dir_of

HARNESS = os.path.join(ROOT, "tests", "faults", "nan_train.py")
# manager.roll_back's stages, in order, at which nan_train.py's MEGAPILE_KILL_IN_ROLLBACK kills rank 0
ROLLBACK_STAGES = ("before-record", "recorded", "loaded", "set-aside")


@dataclass
class Report:
    injected: int = 0  # SIGKILLs sent to a live rank
    survived: int = 0  # of those, how many the restarted job recovered from
    steps_lost: int = 0  # steps recomputed because they were done after the last checkpoint
    restarts: int = 0
    kinds: dict = field(default_factory=dict)  # where the kills landed: KINDS

    def line(self) -> str:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.kinds.items()))
        return (f"faults injected {self.injected} / survived {self.survived} / steps lost {self.steps_lost} "
                f"(restarts {self.restarts}; kills during {kinds})")


KINDS = ("save", "seal", "step", "start")  # where a kill lands: writing slices, sealing them, mid-step, start-up


def target(ds_config: str, overrides: list[str]) -> list[str]:
    """What each start runs on 2 ranks under torchrun: the same command every time."""
    return [TRAIN, "--deepspeed_config", ds_config] + overrides


def _workers(launcher: psutil.Process) -> list[psutil.Process]:
    found = []
    for child in launcher.children(recursive=True):
        try:
            if "train.py" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            pass
    return found


def _both_workers(proc) -> list[psutil.Process]:
    """The launcher's 2 training processes, or [] while torchrun has not spawned both (or has exited)."""
    try:
        victims = _workers(psutil.Process(proc.pid))
    except psutil.Error:  # the launcher exited just now
        return []
    return victims if len(victims) == 2 else []


def _last_logged_step(metrics: str, since: float = 0.0) -> int:
    """The last step in metrics.jsonl, counting only a file written at or after `since` (time.time()): a
    restarted job rewrites the file when it resumes, so older contents are the previous start's."""
    try:
        if os.path.getmtime(metrics) < since:
            return 0
        steps = re.findall(r'"step": (\d+)', open(metrics).read())
    except OSError:
        return 0
    return int(steps[-1]) if steps else 0


def _max_steps(overrides: list[str]) -> int:
    return int(next(o.split("=", 1)[1] for o in overrides if o.startswith("train.max_steps=")))


def run_campaign(kills: int, ds_config: str, overrides: list[str], run_dir: str, ckpt_dir: str, seed: int = 0,
                 max_starts: int | None = None) -> Report:
    """Start the job, kill a random rank at a random moment, restart; `kills` times, then let it finish.

    Every kill moment is defined by the job's progress, never by elapsed time, so exactly `kills` kills land
    whatever the machine's speed: during start-up (workers spawned, set-up done), at a step a few steps past
    the checkpoint this start resumes from, or inside a checkpoint save; always before the last two steps.

    A kill counts as survived when the next start of the same command comes back up (resuming from the
    newest good checkpoint, or from scratch if none was complete); steps lost are the steps it had logged
    beyond the checkpoint the next start resumed from.
    """
    rng = random.Random(seed)
    report = Report()
    metrics = os.path.join(run_dir, "metrics.jsonl")
    last = _max_steps(overrides)
    pending: list[int] = []  # progress at each kill not yet followed by a start that came back up
    logs = run_dir + "-logs"  # each start's output, NAME-K.out/.err, beside the run directory
    for _ in range(max_starts or 4 * kills + 5):
        resume_step = max((s for s, _ in _complete(ckpt_dir)), default=0)
        started = time.time()
        with start_ranks("torchrun", 2, target(ds_config, overrides), logs) as proc:
            killed = False
            if report.injected < kills:
                kind = KINDS[report.injected % len(KINDS)]  # each kind in turn: a few kills cover all of them
                if resume_step + 6 >= last:
                    kind = "start"  # too close to the end for a later moment to be sure to come
                if _wait_for_moment(proc, kind, rng, ckpt_dir, metrics, started, resume_step, last):
                    victims = []

                    def spawned() -> bool:  # early in start-up torchrun may not have spawned both yet
                        victims[:] = _both_workers(proc)
                        return bool(victims)

                    if wait_for(spawned, proc, 60, "both training processes", exit_ok=True):
                        progress = _last_logged_step(metrics, started)
                        rng.choice(victims).kill()  # SIGKILL: no handler, no cleanup
                        killed = True
            finished = proc.finish(timeout=600, check=False)
        out = finished.stdout
        if pending and "megapile:" in out:  # the job came back up after the previous kill(s)
            resumed = re.search(r"resumed from \S+ at step (\d+)", out)
            report.steps_lost += max(0, max(pending) - (int(resumed.group(1)) if resumed else 0))
            report.survived += len(pending)
            pending = []
        if killed:
            report.injected += 1
            report.kinds[kind] = report.kinds.get(kind, 0) + 1
            report.restarts += 1
            pending.append(progress)
            continue
        if finished.returncode == 0:
            return report
        raise AssertionError(f"training failed without a fault: {proc.describe()}")
    raise AssertionError("the job did not finish in the allowed number of starts")


def _complete(ckpt_dir: str) -> list[tuple[int, str]]:
    if not os.path.isdir(ckpt_dir):
        return []
    return [(int(m.group(1)), n) for n in os.listdir(ckpt_dir) if (m := re.match(r"^global_step(\d+)$", n))]


def _wait_for_moment(proc, kind: str, rng: random.Random, ckpt_dir: str, metrics: str, started: float,
                     resume_step: int, last: int) -> bool:
    """Block until the chosen kind of moment of this start; False if the job ended first (a bug: every moment
    chosen comes before the job's end). Bounded by a generous deadline, never by a guess of the machine's speed."""

    def wait(predicate) -> bool:
        return wait_for(predicate, proc, 300, f"a {kind!r} moment to kill", exit_ok=True)

    if kind == "start":  # start-up: as soon as the workers exist, or once set-up has printed its summary
        if rng.random() < 0.5:
            return wait(lambda: bool(_both_workers(proc)))
        return wait(lambda: "megapile:" in proc.stdout())
    if kind == "step":  # mid-training: a few steps past this start's checkpoint, inside forward/backward/data
        target = min(last - 2, resume_step + rng.randint(1, 4))
        return wait(lambda: _last_logged_step(metrics, started) >= target)

    def saving() -> bool:
        """"save": inside a checkpoint write (a .tmp folder exists: the ranks write their slices) of this start, not
        the last; "seal": past the slices (the index exists: the ranks fsync and checksum, rank 0 writes the
        manifest and renames)."""
        names = os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
        marker = os.path.join("portable", "index.json") if kind == "seal" else ""
        return any((m := re.match(r"^global_step(\d+)\.tmp$", n)) and resume_step < int(m.group(1)) < last
                   and _mtime(os.path.join(ckpt_dir, n)) >= started  # not a killed save's leftover
                   and os.path.exists(os.path.join(ckpt_dir, n, marker)) for n in names)

    if not wait(saving):
        return False
    time.sleep(rng.uniform(0, 0.02))  # a random instant in the save (not a wait); one that ends first: a "step" kill
    return True


def _mtime(path: str) -> float:
    try:
        return os.path.getmtime(path)
    except OSError:
        return 0.0


def run_harness(overrides: list[str], env: dict, check: bool = True) -> subprocess.CompletedProcess:
    """One 2-rank start of tests/faults/nan_train.py (megapile/train.py with faults injected by `env`)."""
    return run_ranks("ranks", 2, [HARNESS] + overrides, run_dir_of(overrides) + "-logs", check=check, env=env)


def kill_in_rollback(stage: str, overrides: list[str], env: dict):
    """Start the job; rank 0 SIGKILLs itself at `stage` of its first loss-spike rollback (a moment defined by
    progress, never by time); restart the same command, without the kill, to the end. Both starts' outputs."""
    killed = run_harness(overrides, {**env, "MEGAPILE_KILL_IN_ROLLBACK": stage}, check=False)
    assert killed.returncode != 0 and f"rank 0 killed in the rollback at {stage}" in killed.stdout, \
        f"exit {killed.returncode}\n{killed.stdout[-3000:]}\n{killed.stderr[-3000:]}"
    return killed, run_harness(overrides, env)
