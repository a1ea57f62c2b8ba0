"""fp16's dynamic loss scale: re-derived when a run changes precision, kept across an fp16 resume; its overflow skips
are not bad data; an overflow at the minimum scale is one line. Runs on CPU through tests/faults/fp16_train.py
(DeepSpeed's fp16 support check flipped), one process, ZeRO-1 (DeepSpeed's DynamicLossScaler)."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaleConfig, LossScaleProfile, LossScaler
from train_helpers import ROOT, read_metrics, small_run_overrides

from megapile.parallel import loss_scale

HARNESS = os.path.join(ROOT, "tests", "faults", "fp16_train.py")
RESUMED = re.compile(r"rank 0 loss scale after resume: (\S+) dynamic (True|False)")


def _ds_json(tmp_path, name: str, **fp16) -> str:
    """A ZeRO-1 DeepSpeed JSON; `fp16` keys (none: fp32) as DeepSpeed's fp16 section."""
    path = str(tmp_path / f"{name}.json")
    config = {"zero_optimization": {"stage": 1}, **({"fp16": {"enabled": True, **fp16}} if fp16 else {})}
    with open(path, "w") as f:
        json.dump(config, f)
    return path


def _run(ds_json: str, overrides: list[str], nan_steps: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", MEGAPILE_NAN_STEPS=nan_steps)
    return subprocess.run([sys.executable, HARNESS, "--deepspeed_config", ds_json, "--no-progress"] + overrides,
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _saved_scaler(run_dir: str, step: int) -> dict:
    with open(os.path.join(run_dir, "checkpoints", f"global_step{step}", "megapile_state.json")) as f:
        return json.load(f)["engine"]["loss_scaler"]


def _resumed_scale(proc) -> tuple[float, bool]:
    scale, dynamic = RESUMED.search(proc.stdout).groups()
    return float(scale), dynamic == "True"


def test_fp16_resumed_from_fp32_starts_at_its_initial_scale(tmp_path, preprocessed, tokenizer_path):
    """Issue 28.2: the fp32 checkpoint's static scale of 1 became fp16's (static) scale, and the next checkpoint
    saved it again; at its minimum two overflows ended the run. An fp16 checkpoint's scale goes on exactly."""
    run_dir = str(tmp_path / "run")
    fp32 = small_run_overrides(preprocessed, tokenizer_path, run_dir, train__max_steps=2)
    ok = _run(_ds_json(tmp_path, "fp32"), fp32)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert _saved_scaler(run_dir, 2) == {"cur_scale": 1.0, "dynamic": False}

    def fp16(steps):
        return small_run_overrides(preprocessed, tokenizer_path, run_dir, train__max_steps=steps, train__dtype="fp16")

    proc = _run(_ds_json(tmp_path, "fp16", initial_scale_power=8), fp16(3))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _resumed_scale(proc) == (2.0 ** 8, True)
    saved = _saved_scaler(run_dir, 3)
    assert saved["dynamic"] and saved["cur_scale"] in (2.0 ** 8, 2.0 ** 7)  # an overflow at step 3 halves it

    # fp16 -> fp16, under another initial scale: the saved one goes on, exactly
    proc = _run(_ds_json(tmp_path, "fp16-high", initial_scale_power=20), fp16(4))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _resumed_scale(proc) == (saved["cur_scale"], True)


def test_fp16_overflow_at_minimum_scale_is_one_line(tmp_path, preprocessed, tokenizer_path):
    """DeepSpeed's "Current loss scale already at minimum" Exception (a traceback) becomes megapile's one line."""
    run_dir = str(tmp_path / "run")
    ds = _ds_json(tmp_path, "fp16", initial_scale_power=40, min_loss_scale=2 ** 39, hysteresis=1)
    proc = _run(ds, small_run_overrides(preprocessed, tokenizer_path, run_dir, train__max_steps=4, train__dtype="fp16"))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("megapile: error:")]
    assert len(errors) == 1 and errors[0] == proc.stderr.strip().splitlines()[-1]
    assert errors[0].startswith("megapile: error: step 2: fp16 gradients overflowed even at the minimum loss scale "
                                "5.49756e+11 (fp16.min_loss_scale)")
    assert "global samples [8, 16)" in errors[0] and "optim.lr" in errors[0] and "bf16" in errors[0]


def test_loss_scale_skips_are_not_bad_steps_but_a_nan_loss_is(tmp_path, preprocessed, tokenizer_path):
    """An initial scale of 2**40 overflows steps 1-2 at finite losses: logged as the scaler's, with
    train.max_bad_steps=2 untouched. NaN losses at steps 3-4 overflow too, but are bad data: the streak stops the
    run."""
    run_dir = str(tmp_path / "run")
    ds = _ds_json(tmp_path, "fp16", initial_scale_power=40, hysteresis=1)
    proc = _run(ds, small_run_overrides(preprocessed, tokenizer_path, run_dir, train__max_steps=6, train__dtype="fp16",
                                        train__max_bad_steps=2), nan_steps="3,4")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "megapile: error: steps 3-4: 2 consecutive steps had a non-finite loss")
    for step in (1, 2):
        assert f"step {step}: update skipped by fp16's loss scaling" in proc.stdout
    assert "step 3: update skipped: non-finite loss or gradient norm, bad step 1 in a row" in proc.stdout
    records = read_metrics(run_dir)
    assert [r["skipped_steps"] for r in records] == [1, 2, 3]
    assert [r["loss_scale_skips"] for r in records] == [1, 2, 2]
    assert [r["loss_scale"] for r in records] == [2.0 ** 39, 2.0 ** 38, 2.0 ** 37]


def test_restore_takes_a_saved_scale_only_into_a_dynamic_scaler():
    """The rule megapile/checkpoint/collective.py applies on load, on DeepSpeed's own scaler objects."""
    def dynamic(init=2.0 ** 16, minimum=1):
        return DynamicLossScaler(init_scale=init, scale_window=1000, min_scale=minimum, delayed_shift=2,
                                 consecutive_hysteresis=False)

    def engine(scaler):
        return type("Engine", (), {"optimizer": type("Optimizer", (), {"loss_scaler": scaler})()})()

    static = {k: v for k, v in vars(LossScaler(1.0)).items() if isinstance(v, (bool, int, float))}
    fresh = dynamic()
    assert not loss_scale.restore(engine(fresh), static) and fresh.cur_scale == 2.0 ** 16  # fp32/bf16's 1: ignored
    saved = vars(dynamic(init=2.0 ** 5)) | {"cur_iter": 7, "last_overflow_iter": 3, "cur_hysteresis": 1}
    resumed = dynamic(minimum=4)
    assert loss_scale.restore(engine(resumed), saved)
    assert (resumed.cur_scale, resumed.cur_iter, resumed.last_overflow_iter, resumed.cur_hysteresis) == (32, 7, 3, 1)
    assert resumed.min_scale == 4  # configuration stays the run's own
    raised = dynamic(minimum=64)
    loss_scale.restore(engine(raised), saved)
    assert raised.cur_scale == 64  # never below this run's minimum
    into_static = LossScaler(1.0)
    assert not loss_scale.restore(engine(into_static), saved) and into_static.cur_scale == 1.0  # fp16 -> fp32/bf16
    # ZeRO-0's optimizers keep the scale in a LossScaleConfig
    config = LossScaleConfig(torch.float16, True, 0, None, profile=LossScaleProfile.UNFUSED)
    assert loss_scale.is_dynamic(config)
    zero0 = type("Engine", (), {"optimizer": type("Optimizer", (), {"loss_scale_config": config})()})()
    assert loss_scale.restore(zero0, saved) and config.cur_scale == 32 and config.cur_iter == 7


def test_deepspeeds_overflow_at_minimum_is_recognised():
    scaler = DynamicLossScaler(init_scale=1.0, scale_window=1000, min_scale=1.0, delayed_shift=1,
                               consecutive_hysteresis=False)
    with pytest.raises(Exception) as raised:
        scaler.update_scale(True)
    assert loss_scale.at_minimum(raised.value)
    assert not loss_scale.at_minimum(RuntimeError(str(raised.value))) and not loss_scale.at_minimum(Exception("x"))
    assert not loss_scale.stuck_at_minimum(scaler, 1.0)  # DynamicLossScaler raises itself
    config = LossScaleConfig(torch.float16, True, 0, None, profile=LossScaleProfile.UNFUSED)
    assert loss_scale.stuck_at_minimum(config, config.min_loss_scale)
    assert not loss_scale.stuck_at_minimum(config, 2 * config.min_loss_scale)

