"""A rank that stops responding (SIGSTOP: alive, holding its sockets, answering nothing) is named by the heartbeat
within train.heartbeat_timeout_s, well before train.collective_timeout_s, and the other rank stops instead of
hanging; the restarted job resumes. (Across hosts, a link that drops everything: tests/test_cluster.py.)"""
import os
import signal
import socket
import time

import pytest
from harness import start_ranks, wait_for
from train_helpers import DS, TRAIN, launch, read_metrics, small_run_overrides


@pytest.mark.slow
def test_stopped_rank_is_named_by_the_heartbeat_and_the_job_resumes(tmp_path, preprocessed, tokenizer_path):
    run_dir = str(tmp_path / "run")
    overrides = small_run_overrides(preprocessed, tokenizer_path, run_dir, train__max_steps=400, checkpoint__every=2,
                                    train__collective_timeout_s=120, train__heartbeat_timeout_s=5,
                                    optim__decay_steps=400)
    # both ranks are killed on the way out, whatever happens (the stopped one with SIGCONT first)
    with start_ranks("ranks", 2, [TRAIN, "--deepspeed_config", os.path.join(DS, "zero1.json")] + overrides,
                     run_dir + "-logs") as job:
        metrics = os.path.join(run_dir, "metrics.jsonl")
        wait_for(lambda: os.path.exists(metrics) and len(open(metrics).readlines()) >= 4, job, 180,
                 "4 logged steps (training under way)")
        survivor, victim = job.ranks
        os.kill(victim.pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        done = survivor.finish(timeout=120, check=False)  # the bound is the assertion: a hang fails here
        waited = time.monotonic() - stopped_at
    assert done.returncode == 1, survivor.describe()
    assert f"megapile: error: {socket.gethostname()} (rank 1, pid {victim.pid}) stopped responding at step " \
           in done.stderr, survivor.describe()
    assert "no heartbeat for 5 s (train.heartbeat_timeout_s" in done.stderr
    assert waited < 120, f"took {waited:.0f} s to fail: the collective timeout, not the heartbeat"
    steps_before = read_metrics(run_dir)[-1]["step"]
    resumed = launch("ranks", 2, "zero1.json", small_run_overrides(
        preprocessed, tokenizer_path, run_dir, train__max_steps=steps_before + 4, checkpoint__every=2,
        optim__decay_steps=400))
    assert "resumed from" in resumed.stdout
    assert read_metrics(run_dir)[-1]["step"] == steps_before + 4
