"""`bench/gpu.sh --dry-run` on CPU: it lists the commands the GPU run would run (megapile/train.py itself for both
presets in bf16, ZeRO-1 and ZeRO-2, flash-attn, the transformers baseline, the memory rows), then runs every step
of the script on CPU with the tiny preset (--cpu-smoke): everything but the CUDA kernels."""
import os
import subprocess

import pytest
from train_helpers import ROOT


@pytest.mark.slow
def test_gpu_bench_dry_run_lists_the_gpu_commands_and_runs_every_step_on_cpu(tmp_path):
    env = dict(os.environ, RESULTS=str(tmp_path / "bench"), STEPS="2", SKIP_COMPILE="1", SKIP_OFFLOAD="1",
               OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu.sh"), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    listing, smoke = proc.stdout.split("now every step on CPU")
    commands = [line for line in listing.splitlines() if line.startswith("+ ")]
    train = [c for c in commands if "megapile/train.py" in c]
    for preset in ("pythia-160m", "pythia-1b"):
        assert any(f"--config configs/{preset}.yaml parallel.zero_stage=1" in c for c in train), train
    assert any("parallel.zero_stage=2" in c for c in train) and any("model.attention=flash_attn" in c for c in train)
    assert all("train.dtype=bf16" in c for c in train)
    assert any("bench/train_throughput.py --preset pythia-1b --device cuda --dtype bf16" in c for c in commands)
    assert any("bench/memory.py --preset pythia-160m --device cuda" in c for c in commands)
    # then each step on CPU: the training rows report their throughput, the baseline and memory benches run
    assert "tiny: " in smoke and "tiny-zero2: " in smoke and "MFU" in smoke, smoke[-3000:]
    assert "bench/train_throughput.py --preset tiny --device cpu" in smoke and "peak RSS" in smoke
    assert "done in" in smoke
