"""Convert configs and state dicts between megapile's GPT and Hugging Face transformers, for every model family.

What differs between families (class names, config fields, parameter names, fused or split q/k/v, GPT-2's
transposed Conv1D weights) is each family's `HFAdapter` (megapile/models/); this module drives the adapter.

Vocabulary padding: an exported HF model gets vocab_size = our padded vocab size (as the
Pythia checkpoints do: 50304 rows for a 50277-token tokenizer), so no rows are dropped and its
logits over the real vocabulary equal ours. On import, HF's vocab_size becomes our vocab_size,
and embedding/head rows are zero-padded up to a multiple of pad_vocab_multiple when needed.
"""
from __future__ import annotations

import os
from typing import Any

import torch
from safetensors.torch import load_file

from megapile.config import ModelConfig
from megapile.model import meta_gpt
from megapile.models import FAMILIES, family_for_hf

HF_CLASS = {name: fam.hf.hf_class for name, fam in FAMILIES.items()}  # model.arch -> transformers class
HF_HEAD = "lm_head.weight"  # the output head in a transformers model, every family
# Older names of the head on disk (GPT-NeoX's embed_out: Pythia, transformers 4), renamed on load.
_HF_HEAD_ALIASES = {"embed_out.weight": HF_HEAD}
# Non-parameter buffers older HF checkpoints carry; safe to drop.
_HF_IGNORED = (".attn.bias", ".attn.masked_bias", ".attention.bias", ".attention.masked_bias",
               ".attention.rotary_emb.inv_freq", "rotary_emb.inv_freq")


# ----------------------------------------------------------------------------- configs


def config_to_hf(cfg: ModelConfig):
    """The transformers config (GPTNeoXConfig, GPT2Config, LlamaConfig, ...) of the same model."""
    hf_config = cfg.family.hf.config_to_hf(cfg)
    hf_config.architectures = [cfg.family.hf.hf_class]
    return hf_config


def config_from_hf(hf_config, **overrides: Any) -> ModelConfig:
    """A ModelConfig for a transformers config of any family megapile has; `overrides` win."""
    fam = family_for_hf(hf_config.model_type)
    kwargs = dict(arch=fam.name, **fam.hf.config_from_hf(hf_config))
    if kwargs["intermediate_size"] == 4 * kwargs["hidden_size"]:
        kwargs["intermediate_size"] = None  # our default, so configs compare equal
    if kwargs.get("num_kv_heads") == kwargs["num_heads"]:
        kwargs["num_kv_heads"] = None  # our default
    kwargs.update(overrides)
    return ModelConfig(**kwargs)


# ----------------------------------------------------------------------------- state dicts


def _our_names(cfg: ModelConfig) -> list[str]:
    """Every parameter of GPT(cfg) but the head, which is handled alone (tied or not, named alike in HF)."""
    return [n for n in meta_gpt(cfg).state_dict() if n != "head.weight"]


def state_dict_to_hf(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> a state dict for the model built from `config_to_hf(cfg)`."""
    adapter = cfg.family.hf
    names = _our_names(cfg)  # one meta model, not one per use
    unused = set(sd) - set(names) - {"head.weight"}
    if unused:
        raise KeyError(f"state dict has keys with no Hugging Face counterpart: {sorted(unused)}")
    out = {}
    for name in names:
        for hf, t in zip(adapter.hf_names(name), adapter.to_hf(cfg, name, sd[name]), strict=True):
            out[hf] = t.contiguous()
    out[HF_HEAD] = sd["embed.weight" if cfg.tie_embeddings else "head.weight"]
    return out


def state_dict_from_hf(cfg: ModelConfig, hf_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A HF state dict -> ours for `GPT(cfg)`; embedding and head rows are zero-padded to
    cfg.padded_vocab_size. Unknown keys raise (a few known HF buffers are ignored)."""
    adapter = cfg.family.hf
    hf_sd = {_HF_HEAD_ALIASES.get(k, k): v for k, v in hf_sd.items()}
    out, known = {}, {HF_HEAD}
    for name in _our_names(cfg):
        hf_names = adapter.hf_names(name)
        for hf in hf_names:
            if hf not in hf_sd:
                raise KeyError(f"Hugging Face state dict lacks {hf!r} (for {name!r})")
        out[name] = adapter.from_hf(cfg, name, [hf_sd[hf] for hf in hf_names]).contiguous()
        known.update(hf_names)
    if not cfg.tie_embeddings:
        if HF_HEAD not in hf_sd:
            raise KeyError(f"Hugging Face state dict lacks {HF_HEAD!r} and model.tie_embeddings is false")
        out["head.weight"] = hf_sd[HF_HEAD].contiguous()
    for key in ("embed.weight", "head.weight"):
        if key in out:
            out[key] = _pad_rows(out[key], cfg.padded_vocab_size)
    unknown = [k for k in hf_sd if k not in known and not k.endswith(_HF_IGNORED)]
    if unknown:
        raise KeyError(f"Hugging Face state dict has keys we do not know: {sorted(unknown)}")
    return out


def state_dict_for_disk(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state_dict_to_hf` as a checkpoint file holds it: a tied head left out (safetensors refuses shared
    storage; transformers re-ties on load), an untied one under the family's on-disk name."""
    hf_sd = state_dict_to_hf(cfg, sd)
    head = hf_sd.pop(HF_HEAD)
    if not cfg.tie_embeddings:
        hf_sd[cfg.family.hf.head_on_disk] = head
    return hf_sd


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] > rows:
        raise ValueError(f"vocabulary has {t.shape[0]} rows but the model has only {rows}")
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


# ----------------------------------------------------------------------------- directories


def load_hf_dir(path: str, **overrides: Any) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a local Hugging Face model directory (config.json + *.safetensors or
    pytorch_model*.bin) into our ModelConfig and state dict. Never touches the network."""
    # lazy: transformers is optional (a test extra) and adds ~0.7 s to torch; eval/generate of a checkpoint skip it
    import transformers

    hf_config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    cfg = config_from_hf(hf_config, **overrides)
    files = sorted(os.listdir(path))
    weights = [f for f in files if f.endswith(".safetensors")]
    hf_sd: dict[str, torch.Tensor] = {}
    if weights:
        for f in weights:
            hf_sd.update(load_file(os.path.join(path, f)))
    else:
        weights = [f for f in files if f.startswith("pytorch_model") and f.endswith(".bin")]
        if not weights:
            raise FileNotFoundError(f"{path}: no *.safetensors or pytorch_model*.bin weights")
        for f in weights:
            hf_sd.update(torch.load(os.path.join(path, f), map_location="cpu", weights_only=True))
    return cfg, state_dict_from_hf(cfg, hf_sd)
