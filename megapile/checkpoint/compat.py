"""Refuse to resume a checkpoint into a run it does not belong to, naming what changed."""
from __future__ import annotations

from typing import Any

from megapile.config import ConfigError

# Model keys that change no tensor shape or meaning: they may differ between save and resume.
_FREE_MODEL_KEYS = {"dropout", "activation_checkpointing", "attention", "init_from", "checkpoint_every",
                    "chunked_loss", "compile"}


def check(saved: dict[str, Any], model: dict[str, Any], fingerprints: dict[str, str], allow_data_change: bool,
          path: str) -> None:
    old_model = saved.get("config", {}).get("model", {})
    changed = sorted(k for k in set(old_model) | set(model)
                     if k not in _FREE_MODEL_KEYS and old_model.get(k) != model.get(k))
    if changed:
        diffs = ", ".join(f"model.{k}: {old_model.get(k)!r} -> {model.get(k)!r}" for k in changed)
        raise ConfigError(f"checkpoint {path} was saved with a different model ({diffs})")
    old_prints = saved.get("fingerprints", {})
    if old_prints.get("tokenizer") and old_prints.get("tokenizer") != fingerprints.get("tokenizer"):
        raise ConfigError(f"checkpoint {path} was trained with a different tokenizer (data.tokenizer changed)")
    if old_prints.get("train_data") != fingerprints.get("train_data") and not allow_data_change:
        raise ConfigError(
            f"checkpoint {path} was trained on different data (data.train, its weights or train.seed changed); "
            "set checkpoint.allow_data_change=true to continue on the new data from the same sample index"
        )
