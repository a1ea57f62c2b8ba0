"""A rank that stops responding (SIGSTOP) is named by the heartbeat within train.heartbeat_timeout_s, well before
train.collective_timeout_s, and every rank stops instead of hanging; the restarted job resumes."""
import os
import socket
import time

import psutil
import pytest
from harness import start_ranks, wait_for
from train_helpers import DS, TRAIN, launch, read_metrics, small_run_overrides


def _worker(launcher, rank):
    """The training process of `rank` under the launcher, once torchrun has started it."""
    found = []

    def started() -> bool:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == str(rank) and "train.py" in " ".join(child.cmdline()):
                    found.append(child)
                    return True
            except psutil.Error:
                continue
        return False

    wait_for(started, launcher, 120, f"rank {rank} started", every=0.2)
    return found[0]


@pytest.mark.slow
def test_stopped_rank_fails_the_job_within_the_timeout_and_it_resumes(tmp_path, preprocessed, tokenizer_path):
    run_dir = str(tmp_path / "run")
    overrides = small_run_overrides(preprocessed, tokenizer_path, run_dir, train__max_steps=400, checkpoint__every=2,
                                    train__collective_timeout_s=120, train__heartbeat_timeout_s=5,
                                    optim__decay_steps=400)
    # the launcher's whole tree (the stopped rank too) is killed on the way out, whatever happens
    with start_ranks("torchrun", 2, [TRAIN, "--deepspeed_config", os.path.join(DS, "zero1.json")] + overrides,
                     run_dir + "-logs") as proc:
        victim = _worker(proc, 1)
        metrics = os.path.join(run_dir, "metrics.jsonl")
        wait_for(lambda: os.path.exists(metrics) and len(open(metrics).readlines()) >= 4, proc, 180,
                 "4 logged steps (training under way)")
        victim.suspend()  # SIGSTOP: alive, holding its sockets, answering nothing
        stopped_at = time.monotonic()
        try:
            done = proc.finish(timeout=120, check=False)  # the bound is the assertion: a hang fails here
        finally:  # a launcher that exited may leave the stopped rank behind it
            try:
                victim.resume()
                victim.kill()
            except psutil.Error:
                pass
        waited = time.monotonic() - stopped_at
    assert done.returncode != 0
    host = socket.gethostname()
    assert f"megapile: error: {host} (rank 1, pid {victim.pid}) stopped responding at step " in done.stderr, \
        proc.describe()
    assert "no heartbeat for 5 s (train.heartbeat_timeout_s" in done.stderr
    assert waited < 120, f"took {waited:.0f} s to fail: the collective timeout, not the heartbeat"
    steps_before = read_metrics(run_dir)[-1]["step"]
    resumed = launch("torchrun", 2, "zero1.json", small_run_overrides(
        preprocessed, tokenizer_path, run_dir, train__max_steps=steps_before + 4, checkpoint__every=2,
        optim__decay_steps=400))
    assert "resumed from" in resumed.stdout
    assert read_metrics(run_dir)[-1]["step"] == steps_before + 4
