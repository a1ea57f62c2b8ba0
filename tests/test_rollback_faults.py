"""A loss-spike rollback that meets a fault (with asynchronous saves, checkpoint.async: the rollback first commits the
save in flight; tests/test_spikes.py rolls back with synchronous ones): a damaged target falls back to an older intact checkpoint, and a kill
at any stage of the rollback, restarted with the same command, ends exactly as the uninterrupted rollback run (one
rollback spent, the spike's samples never trained).

Samples [64, 80) spike (tests/faults/nan_train.py): steps 9 and 10 (patience 2) roll back to step 5 (rollback_steps
4). A checkpoint every step makes the kill tests able to fail: the newest checkpoint at the kill is step 9, the
first spike (skipped), so a restart that resumes it instead of completing the rollback trains one step fewer on
different samples.
"""
import dataclasses
import json
import os
from types import SimpleNamespace

import pytest
import torch
from faults.campaign import ROLLBACK_STAGES, kill_in_rollback, run_harness
from train_helpers import losses, small_run_overrides

from megapile.checkpoint import manager, manifest, state_file
from megapile.checkpoint.portable import read_full_weights
from megapile.config import ConfigError
from megapile.training.spikes import Rollback

SETTINGS = dict(train__spike__enabled=True, train__spike__min_steps=4, train__spike__window=16, train__eval_every=0,
                train__spike__rollback_steps=4, train__max_steps=12, train__dtype="fp32", parallel__zero_stage=1,
                checkpoint__every=1, checkpoint__keep_last=20, checkpoint__verify="checksum", checkpoint__async=True)
SPIKE = {"MEGAPILE_SPIKE_SAMPLES": "64-80"}
RECORD = {"skip_samples": [[64, 80]], "rollbacks": 1}  # spikes.json after the one rollback, nothing pending


def _overrides(preprocessed, tokenizer_path, run_dir):
    return small_run_overrides(preprocessed, tokenizer_path, run_dir, **SETTINGS)


def _final(run_dir):
    ckpt = os.path.join(run_dir, "checkpoints", "global_step12")
    with open(os.path.join(ckpt, "megapile_state.json")) as f:
        weights = read_full_weights(ckpt, int(json.load(f)["zero_stage"]))
    with open(os.path.join(run_dir, "checkpoints", "spikes.json")) as f:
        return weights, json.load(f)


def _assert_same_run(run_dir, reference):
    weights, record = _final(run_dir)
    expected, _ = _final(reference)
    assert record == RECORD
    assert losses(run_dir) == losses(reference)  # every step once, bit-identical
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in weights)


def _fake_run(ckpt_dir, steps, messages):
    """Checkpoint folders that verify (a state file and a slice file under a manifest), and the parts of a
    one-rank Run that choosing a rollback target reads."""
    for step in steps:
        path = os.path.join(ckpt_dir, f"global_step{step}")
        os.makedirs(os.path.join(path, "portable"))
        with open(os.path.join(path, "megapile_state.json"), "w") as f:
            json.dump(state_file.write_form(dataclasses.asdict(state_file.RunState(step=step))), f)
        with open(os.path.join(path, "portable", "rank00000-0.safetensors"), "wb") as f:
            f.write(bytes(range(256)))
        manifest.write(path)
    spike = SimpleNamespace(max_rollbacks=3, rollback_steps=4)
    return SimpleNamespace(ckpt_dir=ckpt_dir, env=SimpleNamespace(is_main=True, world_size=1),
                           logger=SimpleNamespace(message=messages.append),
                           cfg=SimpleNamespace(checkpoint=SimpleNamespace(verify="checksum"),
                                               train=SimpleNamespace(spike=spike)))


def _rot(ckpt_dir, step):
    with open(os.path.join(ckpt_dir, f"global_step{step}", "portable", "rank00000-0.safetensors"), "r+b") as f:
        f.write(b"\xff")


def test_the_rollback_target_is_the_newest_intact_checkpoint_at_or_before_the_step(tmp_path):
    messages = []
    run = _fake_run(str(tmp_path), [2, 4, 6], messages)
    assert manager._rollback_target(run, 5)[0].step == 4 and messages == []
    _rot(run.ckpt_dir, 4)
    found, _ = manager._rollback_target(run, 5)
    assert found.step == 2 and len(messages) == 1
    assert messages[0].startswith(f"warning: skipping checkpoint {tmp_path}/global_step4: ")
    assert messages[0].endswith("fails its checksum (the bytes changed after saving); rolling back further")
    _rot(run.ckpt_dir, 2)
    assert manager._rollback_target(run, 5) == (None, True)  # damaged ones only, so the error says "intact"
    with pytest.raises(manager.TrainingError, match=f"^step 9: why, but {tmp_path} holds no intact checkpoint at or "
                       "before step 5 to roll back to"):
        manager.roll_back(run, Rollback(9, (64, 80), "why"))
    assert not os.path.exists(os.path.join(tmp_path, "spikes.json"))  # nothing recorded for a refused rollback


def test_a_pending_rollback_is_completed_from_its_target_or_an_older_intact_one(tmp_path):
    messages = []
    run = _fake_run(str(tmp_path), [2, 4, 6], messages)
    assert manager._pending_rollback(run) is None
    target = os.path.join(str(tmp_path), "global_step4")
    manager._write_spike_record(run.ckpt_dir, {"skip_samples": [[64, 80]], "rollbacks": 1,
                                               "pending": {"path": target, "step": 4}})
    assert manager._pending_rollback(run).step == 4 and f"rollback to {target} that was interrupted" in messages[-1]
    _rot(run.ckpt_dir, 4)
    assert manager._pending_rollback(run).step == 2
    _rot(run.ckpt_dir, 2)
    with pytest.raises(ConfigError, match="no intact checkpoint at or before step 4 remains"):
        manager._pending_rollback(run)
    manager._clear_pending(run)
    assert manager._spike_record(run.ckpt_dir) == {"skip_samples": [[64, 80]], "rollbacks": 1}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, preprocessed, tokenizer_path):
    run_dir = str(tmp_path_factory.mktemp("uninterrupted"))
    proc = run_harness(_overrides(preprocessed, tokenizer_path, run_dir), SPIKE)
    assert "rank 0 rolled back to step 5, skipping [[64, 80]]" in proc.stdout
    assert _final(run_dir)[1] == RECORD
    return run_dir


@pytest.mark.slow
def test_a_damaged_rollback_target_falls_back_to_the_next_older_intact_checkpoint(
        uninterrupted, tmp_path, preprocessed, tokenizer_path):
    """global_step5 rots before the rollback: it is named with what is wrong, the rollback takes step 4, and the run
    ends as the uninterrupted one (from step 4 the same samples are retrained with the same RNG streams)."""
    run_dir = str(tmp_path / "damaged")
    proc = run_harness(_overrides(preprocessed, tokenizer_path, run_dir),
                       {**SPIKE, "MEGAPILE_DAMAGE_BEFORE_ROLLBACK": "global_step5"})
    out = proc.stdout + proc.stderr
    assert f"warning: skipping checkpoint {run_dir}/checkpoints/global_step5: " in out, out[-3000:]
    assert "fails its checksum (the bytes changed after saving); rolling back further" in out
    assert "rank 0 rolled back to step 4, skipping [[64, 80]]" in proc.stdout
    assert "rank 1 rolled back to step 4, skipping [[64, 80]]" in proc.stdout
    _assert_same_run(run_dir, uninterrupted)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ROLLBACK_STAGES)
def test_a_kill_at_any_stage_of_a_rollback_restarts_into_the_same_run(
        stage, uninterrupted, tmp_path, preprocessed, tokenizer_path):
    """Rank 0 is SIGKILLed inside the rollback; the same command, restarted, completes the recorded rollback (or,
    killed before the record, rolls back anew) and ends bit for bit as the uninterrupted run, one rollback spent."""
    run_dir = str(tmp_path / stage)
    _, again = kill_in_rollback(stage, _overrides(preprocessed, tokenizer_path, run_dir), SPIKE)
    out = again.stdout + again.stderr
    if stage == "before-record":  # nothing decided yet: the restart meets the spike again and rolls back
        assert "rank 0 rolled back to step 5, skipping [[64, 80]]" in again.stdout, out[-3000:]
    else:
        assert "completing the loss-spike rollback to " in out and "loss spike" not in out, out[-3000:]
        assert f"resumed from {run_dir}/checkpoints/global_step5 at step 5" in out
    _assert_same_run(run_dir, uninterrupted)
