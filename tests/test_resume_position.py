"""Where a resumed run goes on: from any intact checkpoint given by path (a rollback), and at the saved global
sample index when `train.global_batch_size` changed in between (batch ramp-up)."""
import json
import os

import numpy as np
import pytest
from train_helpers import launch, read_metrics, small_run_overrides

from megapile.checkpoint import list_complete


def _state(ckpt_dir, step):
    with open(os.path.join(ckpt_dir, f"global_step{step}", "megapile_state.json")) as f:
        return json.load(f)


@pytest.mark.slow
def test_rollback_to_an_older_checkpoint_retrains_the_same_steps(tmp_path, preprocessed, tokenizer_path):
    run_dir = str(tmp_path / "run")
    ckpt = os.path.join(run_dir, "checkpoints")
    common = dict(train__max_steps=12, checkpoint__every=4, checkpoint__keep_last=5, optim__decay_steps=12,
                  model__dropout=0.1)
    launch("python", 1, "zero1.json", small_run_overrides(preprocessed, tokenizer_path, run_dir, **common))
    first = read_metrics(run_dir)
    assert [s for s, _ in list_complete(ckpt)] == [12, 8, 4]

    proc = launch("python", 1, "zero1.json", small_run_overrides(
        preprocessed, tokenizer_path, run_dir, checkpoint__resume=os.path.join(ckpt, "global_step4"), **common))
    assert f"resumed from {os.path.join(ckpt, 'global_step4')} at step 4" in proc.stdout
    assert "rolled back to step 4: global_step12, global_step8 moved to" in proc.stdout
    again = read_metrics(run_dir)
    assert [r["step"] for r in again] == list(range(1, 13))
    assert [r["loss"] for r in again] == [r["loss"] for r in first]  # the same steps, bit for bit
    assert [s for s, _ in list_complete(ckpt)] == [12, 8, 4]  # retrained, not the abandoned ones
    (aside,) = [n for n in os.listdir(os.path.join(ckpt, "rolled_back")) if n.startswith("from_step")]
    assert sorted(os.listdir(os.path.join(ckpt, "rolled_back", aside))) == ["global_step12", "global_step8"]

    # The same command again (a requeue after the rollback): it goes on from the new branch, not back to step 4.
    proc = launch("python", 1, "zero1.json", small_run_overrides(
        preprocessed, tokenizer_path, run_dir, checkpoint__resume=os.path.join(ckpt, "global_step4"),
        **{**common, "train__max_steps": 14}))
    assert "was rolled back to already; resuming this branch's newest checkpoint" in proc.stdout
    assert f"resumed from {os.path.join(ckpt, 'global_step12')} at step 12" in proc.stdout
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, 15))


def test_resume_from_a_damaged_checkpoint_path_names_the_problem(tmp_path, preprocessed, tokenizer_path):
    bad = tmp_path / "checkpoints" / "global_step3"
    bad.mkdir(parents=True)
    with pytest.raises(AssertionError, match=r"megapile: error: checkpoint.resume: .*global_step3 is not a "
                                             r"complete, intact checkpoint: .*manifest.json is missing"):
        launch("python", 1, "zero1.json", small_run_overrides(
            preprocessed, tokenizer_path, str(tmp_path / "run"), checkpoint__resume=str(bad)))


@pytest.mark.slow
def test_a_changed_global_batch_goes_on_at_the_saved_sample_index(tmp_path, preprocessed, tokenizer_path):
    run_dir = str(tmp_path / "run")
    ckpt = os.path.join(run_dir, "checkpoints")
    launch("ranks", 2, "zero1.json", small_run_overrides(preprocessed, tokenizer_path, run_dir, train__max_steps=4,
                                                             checkpoint__every=4))
    assert _state(ckpt, 4)["sample_index"] == 4 * 8
    proc = launch("ranks", 2, "zero1.json", small_run_overrides(
        preprocessed, tokenizer_path, run_dir, train__max_steps=8, train__global_batch_size=16, checkpoint__every=4))
    assert "train.global_batch_size changed from 8 to 16: the next step reads global samples from 32 on" in proc.stdout
    state = _state(ckpt, 8)
    assert state["sample_index"] == 4 * 8 + 4 * 16
    assert state["tokens_seen"] == (4 * 8 + 4 * 16) * 32
    records = read_metrics(run_dir)
    assert [r["samples_seen"] for r in records] == [8, 16, 24, 32, 48, 64, 80, 96]
    assert all(np.isfinite(r["loss"]) for r in records)
