"""A finished ZeRO-3 run exits 0 every time (DeepSpeed's ZeRO-3 on CPU can abort at interpreter exit with
"terminate called without an active exception", which would turn a good run into a failed job)."""
import pytest

from train_helpers import launch, small_run_overrides


@pytest.mark.slow
def test_zero3_runs_exit_zero_every_time(tmp_path, preprocessed, tokenizer_path):
    for attempt in range(7):
        run_dir = str(tmp_path / f"run{attempt}")
        proc = launch("torchrun", 2, "zero3.json", small_run_overrides(  # launch() raises on a non-zero exit
            preprocessed, tokenizer_path, run_dir, train__max_steps=3, checkpoint__every=0))
        assert "terminate called" not in proc.stderr
