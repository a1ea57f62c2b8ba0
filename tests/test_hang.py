"""A rank that stops responding (SIGSTOP) makes the others fail within train.collective_timeout_s with a
message naming it, instead of hanging forever; the restarted job resumes."""
import os
import subprocess
import sys
import time

import psutil
import pytest

from train_helpers import DS, ROOT, TRAIN, free_port, launch, read_metrics, small_run_overrides


def _worker(launcher_pid, rank, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(launcher_pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == str(rank) and "train.py" in " ".join(child.cmdline()):
                    return child
            except psutil.Error:
                continue
        time.sleep(0.2)
    raise AssertionError(f"rank {rank} never started")


@pytest.mark.slow
def test_stopped_rank_fails_the_job_within_the_timeout_and_it_resumes(tmp_path, preprocessed, tokenizer_path):
    run_dir = str(tmp_path / "run")
    overrides = small_run_overrides(preprocessed, tokenizer_path, run_dir, train__max_steps=400, checkpoint__every=2,
                                    train__collective_timeout_s=15, optim__decay_steps=400)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           TRAIN, "--deepspeed_config", os.path.join(DS, "zero1.json")] + overrides
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    victim = _worker(proc.pid, 1)
    metrics = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.monotonic() + 180
    while not (os.path.exists(metrics) and len(open(metrics).readlines()) >= 4):
        assert time.monotonic() < deadline and proc.poll() is None, "training did not get going"
        time.sleep(0.1)
    victim.suspend()  # SIGSTOP: alive, holding its sockets, answering nothing
    stopped_at = time.monotonic()
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        for p in psutil.Process(os.getpid()).children(recursive=True):
            if p.pid != os.getpid():
                try:
                    p.resume()
                    p.kill()
                except psutil.Error:
                    pass
    waited = time.monotonic() - stopped_at
    assert proc.returncode != 0
    assert "a collective did not complete within train.collective_timeout_s=15 s" in err
    assert waited < 15 + 60, f"took {waited:.0f} s to fail"
    steps_before = read_metrics(run_dir)[-1]["step"]
    resumed = launch("torchrun", 2, "zero1.json", small_run_overrides(
        preprocessed, tokenizer_path, run_dir, train__max_steps=steps_before + 4, checkpoint__every=2,
        optim__decay_steps=400))
    assert "resumed from" in resumed.stdout
    assert read_metrics(run_dir)[-1]["step"] == steps_before + 4
