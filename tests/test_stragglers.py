"""A straggler is named: two ranks, each on a core of its own, and a busy process sharing rank 1's core, so rank 1
gets about half a core. Its forward passes take about twice rank 0's; the log names it with the measured ratio,
and the heartbeat (which beats through all of it) takes nobody for dead."""
import os
import re
import subprocess
import sys

import pytest
from harness import free_port, start_command
from train_helpers import DS, TRAIN, read_metrics, small_run_overrides


@pytest.mark.slow
def test_a_rank_on_a_crowded_core_is_named_a_straggler(tmp_path, preprocessed, tokenizer_path):
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPU cores to crowd one rank's and not the other's")
    run_dir = str(tmp_path / "run")
    overrides = small_run_overrides(preprocessed, tokenizer_path, run_dir, train__max_steps=12, train__log_every=4,
                                    train__heartbeat_timeout_s=5)
    port = free_port()
    hog = subprocess.Popen(["taskset", "-c", str(cpus[1]), sys.executable, "-c", "while True: pass"])
    ranks = []
    try:
        for rank in (0, 1):
            argv = ["taskset", "-c", str(cpus[rank]), sys.executable, TRAIN, "--deepspeed_config",
                    os.path.join(DS, "zero1.json"), *overrides]
            ranks.append(start_command(argv, tmp_path / "logs", f"rank{rank}", env={
                "RANK": rank, "WORLD_SIZE": 2, "LOCAL_RANK": rank, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}))
        done = [r.finish(timeout=300) for r in ranks]
    finally:
        hog.kill()
        hog.wait()
        for r in ranks:
            r.stop()
    slow_pid = ranks[1].pid  # taskset execs python: the same process
    named = re.findall(r"straggler: \S+ \(rank (\d), pid (\d+)\) took ([\d.]+)× the other ranks' median forward time",
                       done[0].stdout + done[0].stderr)
    assert named and all(rank == "1" and int(pid) == slow_pid for rank, pid, _ in named), ranks[0].describe()
    assert float(named[0][2]) > 1.5
    ratios = [r["straggler_ratio"] for r in read_metrics(run_dir)]
    assert len(ratios) == 3 and max(ratios) > 1.5
    assert "stopped responding" not in done[0].stderr + done[1].stderr
