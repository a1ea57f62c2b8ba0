"""megapile_state.json, versioned: the one place that says which formats are read and how each is upgraded.

A state file carries `format` (FORMAT when written now). Files written before the key existed are dated by what
they hold. Each older format is upgraded one step at a time to the current one, so every reader gets a `RunState`
with every field present and never supplies its own default.

    1  DeepSpeed's shards; step, sample_index, tokens_seen, world_size, zero_stage, config, fingerprints, rng
    2  + parallel: the tensor x pipeline layout
    3  + param_order: how a ZeRO-0 optimizer numbers the parameters
    4  + tokenizer/: the checkpoint carries its tokenizer (the state file itself is as in 3)
    5  + skip_samples (and spike_detector when train.spike is on)
    6  + dtype; portable/ slices beside DeepSpeed's shards
    7  + engine (DeepSpeed's counters and loss scale); the slices alone, no DeepSpeed shards; + format
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from megapile.config import ConfigError

STATE_FILE = "megapile_state.json"
TOKENIZER_DIR = "tokenizer"  # the tokenizer a checkpoint carries (format 4 on)
FORMAT = 7


@dataclass
class RunState:
    """A checkpoint's megapile_state.json in the current format. The defaults are what an upgrade fills in for
    a format that did not record the field."""

    step: int = 0
    sample_index: int = 0
    tokens_seen: int = 0
    world_size: int = 1
    zero_stage: int = 0
    parallel: dict = field(default_factory=lambda: {"tensor": 1, "pipeline": 1, "data": 1})
    dtype: Optional[str] = None  # None: saved before checkpoints recorded it (format < 6)
    config: dict = field(default_factory=dict)  # the run's full config, as Config.to_dict() gave it then
    fingerprints: dict = field(default_factory=dict)  # {"tokenizer": sha256, "train_data": sha256}
    skip_samples: list = field(default_factory=list)  # global sample ranges never trained
    spike_detector: Optional[dict] = None  # the loss-spike window; None: saved without train.spike
    param_order: list = field(default_factory=list)  # the optimizer's parameter order; []: unrecorded (format < 3)
    engine: dict = field(default_factory=dict)  # DeepSpeed's counters and loss scale; {}: unrecorded (format < 7)
    rng: list = field(default_factory=list)  # every rank's RNG streams
    versions: dict = field(default_factory=dict)  # megapile, deepspeed, torch that wrote it
    format: int = FORMAT  # the format the file was written in (upgraded since, if older)

    @property
    def tensor(self) -> int:
        return int(self.parallel.get("tensor", 1))

    @property
    def pipeline(self) -> int:
        return int(self.parallel.get("pipeline", 1))


def read(path: str) -> RunState:
    """The state file of checkpoint folder `path`, upgraded to the current format; ConfigError (one line) for a
    format newer than this megapile reads."""
    with open(os.path.join(path, STATE_FILE)) as f:
        raw = json.load(f)
    return upgrade(raw, carries_tokenizer=os.path.isdir(os.path.join(path, TOKENIZER_DIR)))


def upgrade(raw: dict[str, Any], carries_tokenizer: bool = True) -> RunState:
    """`raw` (a state file's JSON) upgraded step by step to the current format."""
    version = raw.get("format") or infer_format(raw, carries_tokenizer)
    if version > FORMAT:
        raise ConfigError(f"checkpoint written by a newer megapile (format {version}; this megapile reads up to "
                          f"{FORMAT})")
    state = dict(raw)
    for step in _UPGRADES[version - 1:]:
        state = step(state)
    known = {k: v for k, v in state.items() if k in RunState.__dataclass_fields__}
    return RunState(**{**known, "format": version, "zero_stage": int(state["zero_stage"])})


def infer_format(raw: dict[str, Any], carries_tokenizer: bool) -> int:
    """The format of a state file written before `format` was recorded, from the newest thing it holds."""
    for key, version in (("engine", 7), ("dtype", 6), ("skip_samples", 5)):
        if key in raw:
            return version
    if carries_tokenizer:
        return 4
    return 3 if "param_order" in raw else 2 if "parallel" in raw else 1


def write_form(state: dict[str, Any]) -> dict[str, Any]:
    """What a save writes: `state` stamped with the current format."""
    return {"format": FORMAT, **state}


def _v1_to_v2(state: dict) -> dict:
    # Before tensor/pipeline parallelism every checkpoint was data-parallel only.
    return {**state, "parallel": {"tensor": 1, "pipeline": 1, "data": state["world_size"]}}


def _v2_to_v3(state: dict) -> dict:
    # Only bf16/fp16 ZeRO-0 reads need the order; those checkpoints cannot be read without it (see portable.py).
    return {**state, "param_order": []}


def _v3_to_v4(state: dict) -> dict:
    return state  # the tokenizer folder was added beside the state file; the file is unchanged


def _v4_to_v5(state: dict) -> dict:
    return {**state, "skip_samples": [], "spike_detector": None}


def _v5_to_v6(state: dict) -> dict:
    return {**state, "dtype": None}  # unrecorded: a dynamic loss scaler in `engine`, if any, says fp16


def _v6_to_v7(state: dict) -> dict:
    return {**state, "engine": {}}  # DeepSpeed's own files hold the counters: its load restores them


# _UPGRADES[n - 1] turns format n into n + 1; a new format appends its step here and raises FORMAT.
_UPGRADES: list[Callable[[dict], dict]] = [_v1_to_v2, _v2_to_v3, _v3_to_v4, _v4_to_v5, _v5_to_v6, _v6_to_v7]
