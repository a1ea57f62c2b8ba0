"""Checkpoints of every megapile_state.json format (tests/data/state_formats, each written by the megapile of its
time) load through the one state loader as the current format and still resume; a newer format is refused."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil

import pytest
from train_helpers import launch, read_metrics

from megapile.checkpoint import state_file, tools
from megapile.checkpoint.state_file import FORMAT, STATE_FILE, RunState
from megapile.config import ConfigError

FIXTURES = os.path.join(os.path.dirname(__file__), "data", "state_formats")
FORMATS = range(1, FORMAT + 1)
# Every fixture is the same 2 steps of the same run, so step 3 after a resume is the same loss from any format.
STEP3_LOSS = 5.674115180969238


def _checkpoint(version: int) -> str:
    return os.path.join(FIXTURES, f"v{version}", "global_step2")


@pytest.mark.parametrize("version", FORMATS)
def test_each_format_loads_as_the_current_one(version):
    with open(os.path.join(_checkpoint(version), STATE_FILE)) as f:
        raw = json.load(f)
    assert "format" not in raw  # written before the key existed: dated by what it holds
    state = state_file.read(_checkpoint(version))
    assert state.format == version
    assert (state.step, state.sample_index, state.tokens_seen, state.world_size, state.zero_stage) == (2, 4, 64, 1, 0)
    assert (state.tensor, state.pipeline) == (1, 1)
    assert state.dtype == (None if version < 6 else "fp32")
    assert bool(state.param_order) == (version >= 3)
    assert state.engine.get("global_steps") == (2 if version >= 7 else None)
    assert state.skip_samples == [] and state.config["model"]["num_layers"] == 1 and len(state.rng) == 1
    assert set(dataclasses.asdict(state)) == set(RunState.__dataclass_fields__)


def test_a_saved_state_carries_the_current_format():
    assert state_file.write_form({"step": 1})["format"] == FORMAT
    assert state_file.upgrade({**dataclasses.asdict(RunState()), "format": FORMAT}).format == FORMAT


@pytest.mark.parametrize("version", FORMATS)
def test_each_format_resumes(version, tmp_path):
    data = shutil.copytree(os.path.join(FIXTURES, "data"), tmp_path / "data")  # the loader caches beside it
    overrides = {
        "data.train": data / "train", "data.valid": data / "valid", "data.tokenizer": data / "tokenizer.json",
        "model.num_layers": 1, "model.hidden_size": 16, "model.num_heads": 2, "model.tie_embeddings": "true",
        "model.pad_vocab_multiple": 8, "model.intermediate_size": 16, "model.max_seq_len": 16, "train.seq_len": 16,
        "train.micro_batch_size": 2, "train.global_batch_size": 2, "train.max_steps": 3, "train.log_every": 1,
        "train.eval_iters": 1, "logging.run_dir": tmp_path / "run", "logging.wandb": "false",
        "checkpoint.resume": _checkpoint(version),
    }
    proc = launch("python", 1, "zero0.json", [f"{k}={v}" for k, v in overrides.items()], timeout=300)
    assert f"resumed from {_checkpoint(version)} at step 2 (sample 4, 64 tokens seen)" in proc.stdout + proc.stderr
    [record] = read_metrics(str(tmp_path / "run"))
    assert record["step"] == 3 and record["loss"] == pytest.approx(STEP3_LOSS, rel=1e-5)
    saved = state_file.read(str(tmp_path / "run" / "checkpoints" / "global_step3"))
    assert saved.format == FORMAT and saved.step == 3


def test_a_newer_format_is_refused_in_one_line(tmp_path, capsys):
    path = shutil.copytree(_checkpoint(FORMAT), tmp_path / "global_step2")
    with open(path / STATE_FILE) as f:
        raw = json.load(f)
    with open(path / STATE_FILE, "w") as f:
        json.dump({**raw, "format": FORMAT + 1}, f)
    message = f"checkpoint written by a newer megapile (format {FORMAT + 1}; this megapile reads up to {FORMAT})"
    with pytest.raises(ConfigError) as e:
        state_file.read(str(path))
    assert str(e.value) == message
    assert tools.cli_main(argparse.Namespace(action="info", dir=str(path))) == 1
    assert capsys.readouterr().err == f"megapile: error: {message}\n"
