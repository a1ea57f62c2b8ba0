"""The model families megapile builds, each described as data in its own module (see family.py)."""
from __future__ import annotations

from megapile.errors import ConfigError
from megapile.models.family import Family, TensorPlan
from megapile.models.gpt2 import GPT2
from megapile.models.llama import LLAMA
from megapile.models.neox import NEOX
from megapile.models.qwen2 import QWEN2

FAMILIES: dict[str, Family] = {f.name: f for f in (NEOX, GPT2, LLAMA, QWEN2)}


def family(arch: str) -> Family:
    """The family named by model.arch."""
    if arch not in FAMILIES:
        raise ConfigError(f"model.arch must be one of {sorted(FAMILIES)}, got {arch!r}")
    return FAMILIES[arch]


def family_for_hf(model_type: str) -> Family:
    """The family whose transformers model_type is `model_type` (config.json)."""
    for f in FAMILIES.values():
        if f.hf.model_type == model_type:
            return f
    known = ", ".join(f.hf.model_type for f in FAMILIES.values())
    raise ConfigError(f"cannot convert a Hugging Face {model_type!r} model; only {known}")


__all__ = ["FAMILIES", "Family", "TensorPlan", "family", "family_for_hf"]
