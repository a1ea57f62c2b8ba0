"""A NaN loss or gradient skips the update on every rank; a streak of them stops the run, naming the batch,
with the last good checkpoint untouched; non-finite weights are never saved."""
import os

import pytest
import torch
from harness import run_ranks
from train_helpers import DS, ROOT, read_metrics, run_dir_of, small_run_overrides

from megapile.checkpoint import list_complete
from megapile.checkpoint.portable import read_full_weights

HARNESS = os.path.join(ROOT, "tests", "faults", "nan_train.py")


def _run(nproc, ds, overrides, nan_steps, **env):
    return run_ranks("ranks" if nproc > 1 else "python", nproc,
                     [HARNESS, "--deepspeed_config", os.path.join(DS, ds)] + overrides,
                     run_dir_of(overrides) + "-logs", check=False, env={"MEGAPILE_NAN_STEPS": nan_steps, **env})


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 3])
def test_one_nan_batch_skips_that_update_on_every_rank(stage, tmp_path, preprocessed, tokenizer_path):
    run_dir = str(tmp_path / "run")
    proc = _run(2, f"zero{stage}.json", small_run_overrides(
        preprocessed, tokenizer_path, run_dir, train__max_steps=6, checkpoint__every=1, checkpoint__keep_last=10),
        nan_steps="3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_metrics(run_dir)
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1, 1, 1]
    assert records[2]["loss"] != records[2]["loss"]  # NaN at step 3 (on one rank, averaged over both)
    assert all(r["loss"] == r["loss"] for i, r in enumerate(records) if i != 2)
    for rank in (0, 1):
        assert f"rank {rank} step 3 weights unchanged: True" in proc.stdout
    ckpt = os.path.join(run_dir, "checkpoints")
    assert [s for s, _ in list_complete(ckpt)][::-1] == [1, 2, 4, 5, 6]  # nothing saved at the bad step
    weights = read_full_weights(os.path.join(ckpt, "global_step6"), stage)
    assert all(torch.isfinite(v).all() for v in weights.values())


@pytest.mark.slow
def test_pipeline_zero0_skips_a_nan_step_and_logs_the_norm(tmp_path, preprocessed, tokenizer_path):
    """Under the pipeline engine DeepSpeed steps a plain ZeRO-0 optimizer whatever the gradients hold:
    megapile's guard (parallel/pipeline.py) must skip the update on both stages and report the norm."""
    run_dir = str(tmp_path / "run")
    proc = _run(2, "zero0.json", small_run_overrides(
        preprocessed, tokenizer_path, run_dir, train__max_steps=5, parallel__pipeline=2), nan_steps="3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_metrics(run_dir)
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1, 1]
    assert all(r["grad_norm"] is not None and 0 < r["grad_norm"] < float("inf") for i, r in enumerate(records) if i != 2)
    for rank in (0, 1):
        assert f"rank {rank} step 3 weights unchanged: True" in proc.stdout


@pytest.mark.slow
def test_a_streak_of_nans_stops_with_the_batch_named(tmp_path, preprocessed, tokenizer_path):
    run_dir = str(tmp_path / "run")
    proc = _run(1, "zero1.json", small_run_overrides(
        preprocessed, tokenizer_path, run_dir, train__max_steps=10, checkpoint__every=2, train__max_bad_steps=3),
        nan_steps="3,4,5,6,7,8,9,10")
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("megapile: error: steps 3-5: 3 consecutive steps had a non-finite loss")
    assert "global samples [16, 24)" in last and "weights are those after step 2" in last
    assert [s for s, _ in list_complete(os.path.join(run_dir, "checkpoints"))] == [2]  # no save during the streak


@pytest.mark.slow
def test_a_skipped_last_or_stop_step_still_saves_its_checkpoint(tmp_path, preprocessed, tokenizer_path):
    """Issue 28.5: a NaN at the last step, or at the step a stop signal ends, used to leave no checkpoint there (the
    run still exited 75, "checkpointed"). The skipped update left the weights as they were: saving them is safe."""
    last = str(tmp_path / "last")
    proc = _run(1, "zero1.json", small_run_overrides(preprocessed, tokenizer_path, last, train__max_steps=4,
                                                     checkpoint__every=3), nan_steps="4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0 step 4 weights unchanged: True" in proc.stdout
    assert [s for s, _ in list_complete(os.path.join(last, "checkpoints"))] == [4, 3]

    stopped = str(tmp_path / "stopped")
    proc = _run(1, "zero1.json", small_run_overrides(preprocessed, tokenizer_path, stopped, train__max_steps=8,
                                                     checkpoint__every=2), nan_steps="3", MEGAPILE_SIGTERM_AT_STEP="3")
    assert proc.returncode == 75, proc.stderr[-3000:]
    assert [s for s, _ in list_complete(os.path.join(stopped, "checkpoints"))] == [3, 2]
    assert read_metrics(stopped)[-1]["skipped_steps"] == 1
