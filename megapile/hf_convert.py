"""Convert configs and state dicts between megapile's GPT and Hugging Face transformers
(`GPTNeoXForCausalLM` for arch "neox", `GPT2LMHeadModel` for arch "gpt2").

Vocabulary padding: an exported HF model gets vocab_size = our padded vocab size (as the
Pythia checkpoints do: 50304 rows for a 50277-token tokenizer), so no rows are dropped and its
logits over the real vocabulary equal ours. On import, HF's vocab_size becomes our vocab_size,
and embedding/head rows are zero-padded up to a multiple of pad_vocab_multiple when needed.

Layout differences handled here:
- GPT-NeoX's query_key_value is already per head [q, k, v], like ours: copied as is.
- GPT-2's c_attn is [all q | all k | all v] and GPT-2 uses Conv1D, whose weights are stored
  transposed, (in, out): transposed and regrouped per head.
"""
from __future__ import annotations

import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from megapile.config import ConfigError, ModelConfig

_ACT_TO_HF = {
    "neox": {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"},
    "gpt2": {"gelu": "gelu", "gelu_tanh": "gelu_new"},
}
# Every HF name we can read; the tanh ones are the same function to float rounding.
_ACT_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}


# ----------------------------------------------------------------------------- configs


def config_to_hf(cfg: ModelConfig):
    """A transformers GPTNeoXConfig or GPT2Config for the same model."""
    # lazy: transformers is optional (a test extra) and adds ~0.7 s to torch; eval/generate of a checkpoint skip it
    import transformers

    # Special-token ids belong to the tokenizer, which a ModelConfig does not know: HF's defaults
    # are kept when they fit the vocabulary, else unset.
    def token(default: int):
        return default if default < cfg.padded_vocab_size else None

    if cfg.arch == "neox":
        return transformers.GPTNeoXConfig(
            bos_token_id=token(0),
            eos_token_id=token(2),
            vocab_size=cfg.padded_vocab_size,
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            intermediate_size=cfg.ffn_size,
            hidden_act=_ACT_TO_HF["neox"][cfg.activation],
            attention_dropout=cfg.dropout,
            hidden_dropout=cfg.dropout,
            max_position_embeddings=cfg.max_seq_len,
            initializer_range=cfg.init_std,
            layer_norm_eps=cfg.norm_eps,
            tie_word_embeddings=cfg.tie_embeddings,
            use_parallel_residual=cfg.parallel_residual,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": cfg.rotary_base,
                "partial_rotary_factor": cfg.rotary_pct,
            },
            attention_bias=True,
        )
    if cfg.parallel_residual:
        raise ConfigError("GPT-2 in transformers has no parallel residual; set model.parallel_residual: false")
    return transformers.GPT2Config(
        bos_token_id=token(50256),
        eos_token_id=token(50256),
        vocab_size=cfg.padded_vocab_size,
        n_positions=cfg.max_seq_len,
        n_embd=cfg.hidden_size,
        n_layer=cfg.num_layers,
        n_head=cfg.num_heads,
        n_inner=cfg.ffn_size,
        activation_function=_ACT_TO_HF["gpt2"][cfg.activation],
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        layer_norm_epsilon=cfg.norm_eps,
        initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings,
    )


def config_from_hf(hf_config, **overrides: Any) -> ModelConfig:
    """A ModelConfig for a transformers GPTNeoXConfig or GPT2Config; `overrides` win."""
    model_type = hf_config.model_type
    if model_type == "gpt_neox":
        rope = dict(getattr(hf_config, "rope_parameters", None) or {})
        if rope.get("rope_type", "default") != "default":
            raise ConfigError(f"rope_type {rope['rope_type']!r} is not supported; only plain rotary")
        kwargs = dict(
            arch="neox",
            num_layers=hf_config.num_hidden_layers,
            hidden_size=hf_config.hidden_size,
            num_heads=hf_config.num_attention_heads,
            intermediate_size=hf_config.intermediate_size,
            vocab_size=hf_config.vocab_size,
            max_seq_len=hf_config.max_position_embeddings,
            rotary_pct=float(rope.get("partial_rotary_factor", 1.0)),
            rotary_base=float(rope.get("rope_theta", 10000.0)),
            parallel_residual=bool(hf_config.use_parallel_residual),
            tie_embeddings=bool(hf_config.tie_word_embeddings),
            activation=_act_from_hf(hf_config.hidden_act),
            dropout=float(hf_config.hidden_dropout),
            norm_eps=hf_config.layer_norm_eps,
            init_std=hf_config.initializer_range,
        )
        if not getattr(hf_config, "attention_bias", True):
            raise ConfigError("GPT-NeoX with attention_bias=False is not supported")
    elif model_type == "gpt2":
        if hf_config.scale_attn_by_inverse_layer_idx or not hf_config.scale_attn_weights:
            raise ConfigError("GPT-2 variants with non-standard attention scaling are not supported")
        kwargs = dict(
            arch="gpt2",
            num_layers=hf_config.n_layer,
            hidden_size=hf_config.n_embd,
            num_heads=hf_config.n_head,
            intermediate_size=hf_config.n_inner,
            vocab_size=hf_config.vocab_size,
            max_seq_len=hf_config.n_positions,
            parallel_residual=False,
            tie_embeddings=bool(hf_config.tie_word_embeddings),
            activation=_act_from_hf(hf_config.activation_function),
            dropout=float(hf_config.resid_pdrop),
            norm_eps=hf_config.layer_norm_epsilon,
            init_std=hf_config.initializer_range,
        )
    else:
        raise ConfigError(f"cannot convert a Hugging Face {model_type!r} model; only gpt_neox and gpt2")
    if kwargs["intermediate_size"] == 4 * kwargs["hidden_size"]:
        kwargs["intermediate_size"] = None  # our default, so configs compare equal
    kwargs.update(overrides)
    return ModelConfig(**kwargs)


def _act_from_hf(name: str) -> str:
    if name not in _ACT_FROM_HF:
        raise ConfigError(f"activation {name!r} is not supported (known: {', '.join(_ACT_FROM_HF)})")
    return _ACT_FROM_HF[name]


# ----------------------------------------------------------------------------- state dicts


def _neox_names(cfg: ModelConfig) -> dict[str, str]:
    """ours -> HF GPTNeoXForCausalLM, for every parameter except the head."""
    names = {"embed.weight": "gpt_neox.embed_in.weight"}
    for i in range(cfg.num_layers):
        ours, hf = f"blocks.{i}.", f"gpt_neox.layers.{i}."
        for a, b in [("ln1", "input_layernorm"), ("attn.qkv", "attention.query_key_value"),
                     ("attn.proj", "attention.dense"), ("ln2", "post_attention_layernorm"),
                     ("mlp.fc_in", "mlp.dense_h_to_4h"), ("mlp.fc_out", "mlp.dense_4h_to_h")]:
            for kind in ("weight", "bias"):
                names[f"{ours}{a}.{kind}"] = f"{hf}{b}.{kind}"
    names["final_norm.weight"] = "gpt_neox.final_layer_norm.weight"
    names["final_norm.bias"] = "gpt_neox.final_layer_norm.bias"
    return names


def _gpt2_names(cfg: ModelConfig) -> dict[str, str]:
    names = {"embed.weight": "transformer.wte.weight", "pos_embed.weight": "transformer.wpe.weight"}
    for i in range(cfg.num_layers):
        ours, hf = f"blocks.{i}.", f"transformer.h.{i}."
        for a, b in [("ln1", "ln_1"), ("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                     ("ln2", "ln_2"), ("mlp.fc_in", "mlp.c_fc"), ("mlp.fc_out", "mlp.c_proj")]:
            for kind in ("weight", "bias"):
                names[f"{ours}{a}.{kind}"] = f"{hf}{b}.{kind}"
    names["final_norm.weight"] = "transformer.ln_f.weight"
    names["final_norm.bias"] = "transformer.ln_f.bias"
    return names


# transformers 5 names the GPT-NeoX head lm_head in memory; checkpoints on disk (Pythia, and
# transformers 4) call it embed_out, which transformers 5 renames on load. We read both.
_HF_HEAD = {"neox": "lm_head.weight", "gpt2": "lm_head.weight"}
_HF_HEAD_ALIASES = {"embed_out.weight": "lm_head.weight"}
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Non-parameter buffers older HF checkpoints carry; safe to drop.
_HF_IGNORED = (".attn.bias", ".attn.masked_bias", ".attention.bias", ".attention.masked_bias",
               ".attention.rotary_emb.inv_freq", "rotary_emb.inv_freq")


def _qkv_blocked_to_heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[all q | all k | all v] along dim 0 -> per head [q, k, v] (our layout)."""
    rest = t.shape[1:]
    return t.reshape(3, num_heads, -1, *rest).transpose(0, 1).reshape(t.shape)


def _qkv_heads_to_blocked(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    rest = t.shape[1:]
    return t.reshape(num_heads, 3, -1, *rest).transpose(0, 1).reshape(t.shape)


def state_dict_to_hf(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> a state dict for the model built from `config_to_hf(cfg)`."""
    names = _neox_names(cfg) if cfg.arch == "neox" else _gpt2_names(cfg)
    out = {}
    for ours, hf in names.items():
        t = sd[ours]
        if cfg.arch == "gpt2":
            if ours.endswith("attn.qkv.weight") or ours.endswith("attn.qkv.bias"):
                t = _qkv_heads_to_blocked(t, cfg.num_heads)
            if hf.endswith(_CONV1D):
                t = t.t()
        out[hf] = t.contiguous()
    out[_HF_HEAD[cfg.arch]] = sd["embed.weight" if cfg.tie_embeddings else "head.weight"]
    unused = set(sd) - set(names) - {"head.weight"}
    if unused:
        raise KeyError(f"state dict has keys with no Hugging Face counterpart: {sorted(unused)}")
    return out


def state_dict_from_hf(cfg: ModelConfig, hf_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A HF state dict -> ours for `GPT(cfg)`; embedding and head rows are zero-padded to
    cfg.padded_vocab_size. Unknown keys raise (a few known HF buffers are ignored)."""
    names = _neox_names(cfg) if cfg.arch == "neox" else _gpt2_names(cfg)
    hf_sd = {_HF_HEAD_ALIASES.get(k, k): v for k, v in hf_sd.items()}
    out = {}
    for ours, hf in names.items():
        if hf not in hf_sd:
            raise KeyError(f"Hugging Face state dict lacks {hf!r} (for {ours!r})")
        t = hf_sd[hf]
        if cfg.arch == "gpt2":
            if hf.endswith(_CONV1D):
                t = t.t()
            if ours.endswith("attn.qkv.weight") or ours.endswith("attn.qkv.bias"):
                t = _qkv_blocked_to_heads(t, cfg.num_heads)
        out[ours] = t.contiguous()
    head = _HF_HEAD[cfg.arch]
    if not cfg.tie_embeddings:
        if head not in hf_sd:
            raise KeyError(f"Hugging Face state dict lacks {head!r} and model.tie_embeddings is false")
        out["head.weight"] = hf_sd[head].contiguous()
    for key in ("embed.weight", "head.weight"):
        if key in out:
            out[key] = _pad_rows(out[key], cfg.padded_vocab_size)
    unknown = [k for k in hf_sd if k not in set(names.values()) | {head} and not k.endswith(_HF_IGNORED)]
    if unknown:
        raise KeyError(f"Hugging Face state dict has keys we do not know: {sorted(unknown)}")
    return out


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


def save_hf_dir(cfg: ModelConfig, sd: dict[str, torch.Tensor], path: str) -> None:
    """Write our weights as a Hugging Face model directory (config.json + model.safetensors)."""
    os.makedirs(path, exist_ok=True)
    hf_config = config_to_hf(cfg)
    hf_config.architectures = ["GPTNeoXForCausalLM" if cfg.arch == "neox" else "GPT2LMHeadModel"]
    hf_config.save_pretrained(path)
    hf_sd = state_dict_to_hf(cfg, sd)
    head = hf_sd.pop(_HF_HEAD[cfg.arch])
    if not cfg.tie_embeddings:  # tied: safetensors refuses shared storage; HF re-ties on load
        hf_sd["embed_out.weight" if cfg.arch == "neox" else "lm_head.weight"] = head  # on-disk names
    save_file({k: v.detach().cpu().contiguous() for k, v in hf_sd.items()}, os.path.join(path, "model.safetensors"))
