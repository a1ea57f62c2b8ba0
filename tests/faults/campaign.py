"""Kill campaign: SIGKILL a random rank of a 2-rank training job at random moments, restart the same command,
and check that the finished run equals an uninterrupted one bit for bit (per-step losses and final weights).

Used by tests/test_faults.py (K=10) and bench/faults.py (K=50).
"""
from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(ROOT, "megapile", "train.py")


@dataclass
class Report:
    injected: int = 0  # SIGKILLs sent to a live rank
    survived: int = 0  # of those, how many the restarted job recovered from
    steps_lost: int = 0  # steps recomputed because they were done after the last checkpoint
    restarts: int = 0
    kinds: dict = field(default_factory=dict)  # where the kills landed: "save", "step", "start"

    def line(self) -> str:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.kinds.items()))
        return (f"faults injected {self.injected} / survived {self.survived} / steps lost {self.steps_lost} "
                f"(restarts {self.restarts}; kills during {kinds})")


def command(ds_config: str, overrides: list[str], port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
            TRAIN, "--deepspeed_config", ds_config] + overrides


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline")


def _workers(launcher: psutil.Process) -> list[psutil.Process]:
    found = []
    for child in launcher.children(recursive=True):
        try:
            if "train.py" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            pass
    return found


def _wait_for_workers(proc, timeout: float = 60.0) -> list[psutil.Process]:
    """The launcher's training processes; early in start-up torchrun may not have spawned them yet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        victims = _workers(psutil.Process(proc.pid))
        if len(victims) == 2:
            return victims
        time.sleep(0.01)
    return []


def _last_logged_step(metrics: str) -> int:
    if not os.path.exists(metrics):
        return 0
    steps = re.findall(r'"step": (\d+)', open(metrics).read())
    return int(steps[-1]) if steps else 0


def run_campaign(kills: int, ds_config: str, overrides: list[str], run_dir: str, ckpt_dir: str, port_fn,
                 seed: int = 0, max_starts: int | None = None) -> Report:
    """Start the job, kill a random rank at a random moment, restart; `kills` times, then let it finish.

    A kill counts as survived when the next start of the same command comes back up (resuming from the
    newest good checkpoint, or from scratch if none was complete); steps lost are the steps it had logged
    beyond the checkpoint the next start resumed from.
    """
    rng = random.Random(seed)
    report = Report()
    metrics = os.path.join(run_dir, "metrics.jsonl")
    pending: list[int] = []  # progress at each kill not yet followed by a start that came back up
    for _ in range(max_starts or 4 * kills + 5):
        proc = subprocess.Popen(command(ds_config, overrides, port_fn()), cwd=ROOT, env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        killed = False
        if report.injected < kills:
            kind = rng.choice(["save", "step", "start"])
            if _wait_for_moment(proc, kind, rng, ckpt_dir, metrics):
                victims = _wait_for_workers(proc)
                if victims:
                    progress = _last_logged_step(metrics)
                    rng.choice(victims).kill()  # SIGKILL: no handler, no cleanup
                    killed = True
        out, err = proc.communicate(timeout=600)
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
        if proc.returncode == 0:
            return report
        raise AssertionError(f"training failed without a fault (exit {proc.returncode}):\n{err[-3000:]}")
    raise AssertionError("the job did not finish in the allowed number of starts")


def _wait_for_moment(proc, kind: str, rng: random.Random, ckpt_dir: str, metrics: str) -> bool:
    """Block until the chosen kind of moment; False if the job ended first."""
    deadline = time.monotonic() + 300
    if kind == "start":  # anywhere from process start through start-up and the first steps
        end = time.monotonic() + rng.uniform(0.5, 8.0)
        while time.monotonic() < end:
            if proc.poll() is not None:
                return False
            time.sleep(0.01)
        return True
    if kind == "step":  # mid-training: some steps after the current position, inside forward/backward/data
        target = _last_logged_step(metrics) + rng.randint(1, 4)
        while _last_logged_step(metrics) < target:
            if proc.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.05))
        return True
    while True:  # "save": inside a checkpoint write (a .tmp folder exists), at a random point within it
        if os.path.isdir(ckpt_dir) and any(n.endswith(".tmp") for n in os.listdir(ckpt_dir)):
            time.sleep(rng.uniform(0, 0.02))
            return True
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.002)
