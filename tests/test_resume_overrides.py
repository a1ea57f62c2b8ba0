"""A resume takes the optimizer's settings and the LR schedule from the config in force (megapile/training/optim.py
RESUMED_FROM_CONFIG): lowering optim.lr after instability works, from the very first resumed step."""
import os

import pytest
from train_helpers import launch, read_metrics, small_run_overrides

from megapile.checkpoint.portable import read_full_weights
from megapile.config import load_config
from megapile.training.optim import changed_at_resume, lr_factor


def _run(preprocessed, tokenizer_path, run_dir, **extra):
    values = dict(model__dropout=0.0, train__max_steps=8, checkpoint__every=4, optim__schedule="cosine",
                  optim__warmup_steps=2)
    return launch("python", 1, "zero1.json",
                  small_run_overrides(preprocessed, tokenizer_path, run_dir, **{**values, **extra}))


def _weights(run_dir, step):
    return read_full_weights(os.path.join(run_dir, "checkpoints", f"global_step{step}"), 1)


@pytest.mark.slow
def test_a_resume_follows_the_new_lr_and_schedule_from_its_first_step(tmp_path, preprocessed, tokenizer_path):
    """Issue 28.4: the scheduler's saved base lr won (optim.lr ignored) and the first resumed step used the old
    schedule's saved last lr. Reference: a run with the new settings from the start logs the same lr each step."""
    new = dict(optim__lr=1e-3, optim__schedule="linear", optim__warmup_steps=3, optim__min_lr_ratio=0.5)
    reference = str(tmp_path / "reference")
    _run(preprocessed, tokenizer_path, reference, **new)
    run_dir = str(tmp_path / "run")
    _run(preprocessed, tokenizer_path, run_dir, train__max_steps=4)  # lr 3e-3, cosine, warmup 2
    proc = _run(preprocessed, tokenizer_path, run_dir, **new)
    assert "optim.lr=0.001 (checkpoint: 0.003)" in proc.stdout and "optim.schedule=linear (checkpoint: cosine)" in proc.stdout
    cfg = load_config(None, ["optim.lr=1e-3", "optim.schedule=linear", "optim.warmup_steps=3",
                             "optim.min_lr_ratio=0.5", "train.max_steps=8"])
    resumed = [r["lr"] for r in read_metrics(run_dir)[4:]]
    assert resumed == [r["lr"] for r in read_metrics(reference)[4:]]
    assert resumed == pytest.approx([1e-3 * lr_factor(step, cfg.optim, 8) for step in range(5, 9)], rel=1e-12)

    # the first resumed step itself: with optim.lr=1e-12 it must barely move the weights (the old lr moved them ~1e-3)
    tiny = str(tmp_path / "tiny")
    _run(preprocessed, tokenizer_path, tiny, train__max_steps=4)
    _run(preprocessed, tokenizer_path, tiny, train__max_steps=5, checkpoint__every=1, optim__lr=1e-12)
    before, after = _weights(tiny, 4), _weights(tiny, 5)
    assert max(float((after[k] - before[k]).abs().max()) for k in before) < 1e-9


def test_the_settings_a_resume_changes_are_named():
    saved = load_config(None, ["optim.lr=3e-4", "train.max_steps=100"]).to_dict()
    now = load_config(None, ["optim.lr=1e-4", "optim.beta2=0.99", "train.max_steps=200"]).to_dict()
    assert changed_at_resume(saved, now) == ["optim.lr=0.0001 (checkpoint: 0.0003)",
                                             "optim.beta2=0.99 (checkpoint: 0.95)",
                                             "train.max_steps=200 (checkpoint: 100; the decay ends there)"]
    assert changed_at_resume(saved, saved) == []
