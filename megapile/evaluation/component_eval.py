"""Validation quality per Pile component while training (`train.eval_components: true`).

Each `data.valid` dataset is scored on its own, besides the blended validation loss: its loss per token and
its bits per UTF-8 byte, estimated as loss × (tokens / text bytes) / ln 2 with the dataset's own counts from
its `PREFIX.json` (preprocess records both; `--split-by-component` writes one dataset per component). The
exact per-document figure for a checkpoint is `megapile eval --per-component`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable

from megapile.config import ConfigError
from megapile.evaluation.evaluate import bits_per_byte


@dataclass
class Component:
    name: str  # the dataset's Pile component (PREFIX.json), or its file name when it has none
    batches: Any  # megapile.data.loader.Batches over this dataset alone
    tokens: int  # the dataset's tokens (EOD included) and its documents' UTF-8 bytes, from PREFIX.json
    text_bytes: int

    def bits_per_byte(self, loss: float) -> float:
        """`megapile eval`'s metric, with a mean loss per token standing for the dataset's."""
        return bits_per_byte(loss * self.tokens, self.text_bytes)


def components(prefixes: list[str], batches_of: Callable[[str], Any]) -> list[Component]:
    """One Component per validation dataset; a one-line ConfigError when its counts are missing."""
    if not prefixes:
        raise ConfigError("train.eval_components needs data.valid: the datasets to score one by one")
    found = []
    for prefix in prefixes:
        sidecar = prefix + ".json"
        try:
            with open(sidecar) as f:
                facts = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"train.eval_components: cannot read {sidecar} ({e.__class__.__name__}): "
                              "preprocess the validation data with megapile") from None
        if not facts.get("text_bytes") or not facts.get("tokens"):
            raise ConfigError(f"train.eval_components: {sidecar} has no text_bytes (preprocessed by an older "
                              "megapile): preprocess the validation data again")
        name = facts.get("component") or os.path.basename(prefix)
        found.append(Component(name, batches_of(prefix), facts["tokens"], facts["text_bytes"]))
    names = [c.name for c in found]
    if len(set(names)) != len(names):
        raise ConfigError(f"train.eval_components: data.valid has two datasets of one component ({names})")
    return found
