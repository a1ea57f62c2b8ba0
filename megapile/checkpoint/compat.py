"""Refuse to resume a checkpoint into a run it does not belong to, naming what changed."""
from __future__ import annotations

from typing import Any, Optional

from megapile.checkpoint.state_file import RunState
from megapile.config import ConfigError

# Model keys that change no tensor shape or meaning: they may differ between save and resume. The vocabulary's
# padding changes the embedding's and head's shapes but not the model: a load keeps the real rows
# (megapile/checkpoint/fragments.py) and `vocab_padding_change` says so.
_FREE_MODEL_KEYS = {"dropout", "activation_checkpointing", "attention", "init_from", "checkpoint_every",
                    "chunked_loss", "compile", "pad_vocab_multiple"}


def check(saved: RunState, model: dict[str, Any], fingerprints: dict[str, str], allow_data_change: bool,
          path: str) -> None:
    old_model = saved.config.get("model", {})
    changed = sorted(k for k in set(old_model) | set(model)
                     if k not in _FREE_MODEL_KEYS and old_model.get(k) != model.get(k))
    if changed:
        diffs = ", ".join(f"model.{k}: {old_model.get(k)!r} -> {model.get(k)!r}" for k in changed)
        raise ConfigError(f"checkpoint {path} was saved with a different model ({diffs})")
    old_prints = saved.fingerprints
    if old_prints.get("tokenizer") and old_prints.get("tokenizer") != fingerprints.get("tokenizer"):
        raise ConfigError(f"checkpoint {path} was trained with a different tokenizer (data.tokenizer changed)")
    if old_prints.get("train_data") != fingerprints.get("train_data") and not allow_data_change:
        raise ConfigError(
            f"checkpoint {path} was trained on different data (data.train, its weights or train.seed changed); "
            "set checkpoint.allow_data_change=true to continue on the new data from the same sample index"
        )


def vocab_padding_change(saved: RunState, model: dict[str, Any]) -> Optional[str]:
    """A line saying how the vocabulary's padding rows change on resume, or None when they do not (the real
    vocabulary is the same: `check` compared it)."""
    old_model = saved.config.get("model", {})
    before, after = _padded_rows(old_model), _padded_rows(model)
    if before is None or before == after:
        return None
    return (f"the vocabulary padding changed from {before} to {after} rows (model.pad_vocab_multiple "
            f"{old_model.get('pad_vocab_multiple')} -> {model['pad_vocab_multiple']}): the {model['vocab_size']} real "
            f"rows are the checkpoint's, {'added padding rows are zeros' if after > before else 'the padding is cut'}")


def _padded_rows(model: dict[str, Any]) -> Optional[int]:
    vocab, multiple = model.get("vocab_size"), model.get("pad_vocab_multiple", 128)
    return None if vocab is None else -(-vocab // multiple) * multiple  # ModelConfig.padded_vocab_size
