"""Kill campaign: 4 SIGKILLs of a random rank at random moments, one in each kind of moment (start-up, mid-step, while the ranks write their
checkpoint slices, while they seal them); restarting the same command each time finishes with exactly the uninterrupted run's losses and weights."""
import os

import pytest
import torch
from faults.campaign import KINDS, run_campaign
from train_helpers import DS, launch, losses, small_run_overrides

from megapile.checkpoint import find_resumable
from megapile.checkpoint.portable import read_full_weights


def _overrides(preprocessed, tokenizer_path, run_dir):
    return small_run_overrides(preprocessed, tokenizer_path, run_dir, train__max_steps=80, checkpoint__every=2,
                               optim__decay_steps=80, model__dropout=0.1)


def _final_weights(run_dir):
    found = find_resumable(os.path.join(run_dir, "checkpoints"))
    assert found.step == 80
    return read_full_weights(found.path, found.state.zero_stage)


@pytest.mark.slow
def test_kill_campaign(tmp_path, preprocessed, tokenizer_path, capsys):
    straight = str(tmp_path / "straight")
    launch("ranks", 2, "zero1.json", _overrides(preprocessed, tokenizer_path, straight))
    run_dir = str(tmp_path / "faulty")
    report = run_campaign(len(KINDS), os.path.join(DS, "zero1.json"), _overrides(preprocessed, tokenizer_path, run_dir),
                          run_dir, os.path.join(run_dir, "checkpoints"), seed=1)
    with capsys.disabled():
        print("\n" + report.line())
    assert report.injected == len(KINDS) and report.survived == len(KINDS)
    # every kind of moment, kills inside saves (the ranks writing their slices) and seals among them
    assert set(report.kinds) == set(KINDS), report.kinds
    assert losses(run_dir) == losses(straight)  # every step once, bit-identical
    expected = _final_weights(straight)
    actual = _final_weights(run_dir)
    assert set(actual) == set(expected)
    for name, value in expected.items():
        assert torch.equal(actual[name], value), name
