"""Convert configs and state dicts between megapile's GPT and Hugging Face transformers
(`GPTNeoXForCausalLM` for arch "neox", `GPT2LMHeadModel` for arch "gpt2", `LlamaForCausalLM` for "llama").

Vocabulary padding: an exported HF model gets vocab_size = our padded vocab size (as the
Pythia checkpoints do: 50304 rows for a 50277-token tokenizer), so no rows are dropped and its
logits over the real vocabulary equal ours. On import, HF's vocab_size becomes our vocab_size,
and embedding/head rows are zero-padded up to a multiple of pad_vocab_multiple when needed.

Layout differences handled here:
- GPT-NeoX's query_key_value is already per head [q, k, v], like ours: copied as is.
- GPT-2's c_attn is [all q | all k | all v] and GPT-2 uses Conv1D, whose weights are stored
  transposed, (in, out): transposed and regrouped per head.
- Llama's q_proj, k_proj, v_proj are three matrices; ours is one, grouped per key/value head as
  [q_0 .. q_{g-1}, k, v] (g query heads per key/value head, HF's repeat_kv order): split and regrouped.
  gate_proj/up_proj/down_proj are mlp.gate/fc_in/fc_out.
"""
from __future__ import annotations

import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from megapile.config import ConfigError, ModelConfig

_ACT_TO_HF = {
    "neox": {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "silu": "silu"},
    "gpt2": {"gelu": "gelu", "gelu_tanh": "gelu_new", "silu": "silu"},
    "llama": {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "silu": "silu"},
}
# Every HF name we can read; the tanh ones are the same function to float rounding.
_ACT_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                "silu": "silu", "swish": "silu"}
HF_CLASS = {"neox": "GPTNeoXForCausalLM", "gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}


# ----------------------------------------------------------------------------- configs


def config_to_hf(cfg: ModelConfig):
    """A transformers GPTNeoXConfig, GPT2Config or LlamaConfig for the same model."""
    # lazy: transformers is optional (a test extra) and adds ~0.7 s to torch; eval/generate of a checkpoint skip it
    import transformers

    # Special-token ids belong to the tokenizer, which a ModelConfig does not know: HF's defaults
    # are kept when they fit the vocabulary, else unset.
    def token(default: int):
        return default if default < cfg.padded_vocab_size else None

    # GPT-NeoX and Llama name these alike in transformers (GPT-2 has names of its own, below)
    common = dict(bos_token_id=token(0), eos_token_id=token(2), vocab_size=cfg.padded_vocab_size,
                  hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                  intermediate_size=cfg.ffn_size, hidden_act=_ACT_TO_HF[cfg.arch][cfg.activation],
                  attention_dropout=cfg.dropout, max_position_embeddings=cfg.max_seq_len,
                  initializer_range=cfg.init_std, tie_word_embeddings=cfg.tie_embeddings)
    if cfg.arch == "neox":
        return transformers.GPTNeoXConfig(
            **common,
            hidden_dropout=cfg.dropout,
            layer_norm_eps=cfg.norm_eps,
            use_parallel_residual=cfg.parallel_residual,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": cfg.rotary_base,
                "partial_rotary_factor": cfg.rotary_pct,
            },
            attention_bias=True,
        )
    if cfg.arch == "llama":
        return _llama_config_to_hf(cfg, common)
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


def _llama_config_to_hf(cfg: ModelConfig, common: dict[str, Any]):
    import transformers

    if cfg.parallel_residual:
        raise ConfigError("Llama in transformers has no parallel residual; set model.parallel_residual: false")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rotary_base}
    if cfg.rope_scaling is not None:
        sc = cfg.rope_scaling
        rope.update(rope_type="llama3", factor=sc.factor, low_freq_factor=sc.low_freq_factor,
                    high_freq_factor=sc.high_freq_factor, original_max_position_embeddings=sc.original_max_seq_len)
    return transformers.LlamaConfig(
        **common,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters=rope,
        attention_bias=False,
        mlp_bias=False,
    )


def _llama_config_from_hf(hf_config) -> dict[str, Any]:
    rope = dict(getattr(hf_config, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ("default", "llama3"):
        raise ConfigError(f"rope_type {rope_type!r} is not supported; only plain rotary and llama3 scaling")
    if getattr(hf_config, "attention_bias", False) or getattr(hf_config, "mlp_bias", False):
        raise ConfigError("Llama with attention_bias or mlp_bias is not supported")
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    if head_dim * heads != hf_config.hidden_size:
        raise ConfigError(f"Llama with head_dim {head_dim} x {heads} heads != hidden_size {hf_config.hidden_size} "
                          "is not supported")
    scaling = None
    if rope_type == "llama3":
        scaling = dict(factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
                       high_freq_factor=float(rope["high_freq_factor"]),
                       original_max_seq_len=int(rope["original_max_position_embeddings"]))
    return dict(
        arch="llama",
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        num_heads=heads,
        num_kv_heads=hf_config.num_key_value_heads or heads,
        intermediate_size=hf_config.intermediate_size,
        vocab_size=hf_config.vocab_size,
        max_seq_len=hf_config.max_position_embeddings,
        rotary_base=float(rope.get("rope_theta", 10000.0)),
        rope_scaling=scaling,
        parallel_residual=False,
        tie_embeddings=bool(hf_config.tie_word_embeddings),
        activation=_act_from_hf(hf_config.hidden_act),
        dropout=float(hf_config.attention_dropout),
        norm_eps=hf_config.rms_norm_eps,
        init_std=hf_config.initializer_range,
    )


def config_from_hf(hf_config, **overrides: Any) -> ModelConfig:
    """A ModelConfig for a transformers GPTNeoXConfig, GPT2Config or LlamaConfig; `overrides` win."""
    model_type = hf_config.model_type
    if model_type == "llama":
        kwargs = _llama_config_from_hf(hf_config)
    elif model_type == "gpt_neox":
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
        raise ConfigError(f"cannot convert a Hugging Face {model_type!r} model; only gpt_neox, gpt2 and llama")
    if kwargs["intermediate_size"] == 4 * kwargs["hidden_size"]:
        kwargs["intermediate_size"] = None  # our default, so configs compare equal
    if kwargs["arch"] == "llama" and kwargs["num_kv_heads"] == kwargs["num_heads"]:
        kwargs["num_kv_heads"] = None  # our default
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


def _llama_names(cfg: ModelConfig) -> dict[str, str]:
    """ours -> HF LlamaForCausalLM, for every parameter except the fused QKV and the head."""
    names = {"embed.weight": "model.embed_tokens.weight"}
    for i in range(cfg.num_layers):
        ours, hf = f"blocks.{i}.", f"model.layers.{i}."
        for a, b in [("ln1", "input_layernorm"), ("attn.proj", "self_attn.o_proj"), ("ln2", "post_attention_layernorm"),
                     ("mlp.gate", "mlp.gate_proj"), ("mlp.fc_in", "mlp.up_proj"), ("mlp.fc_out", "mlp.down_proj")]:
            names[f"{ours}{a}.weight"] = f"{hf}{b}.weight"
    names["final_norm.weight"] = "model.norm.weight"
    return names


def _llama_qkv_names(i: int) -> tuple[str, str, str]:
    return tuple(f"model.layers.{i}.self_attn.{x}_proj.weight" for x in "qkv")


def _qkv_split_grouped(t: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Our (nkv * (g + 2) * hs, C) -> HF's q (nh hs, C), k (nkv hs, C), v (nkv hs, C)."""
    g, hs = cfg.kv_groups, cfg.head_dim
    grouped = t.reshape(cfg.kv_heads, (g + 2) * hs, -1)
    q, k, v = grouped.split([g * hs, hs, hs], dim=1)
    return (q.reshape(-1, t.shape[1]), k.reshape(-1, t.shape[1]), v.reshape(-1, t.shape[1]))


def _qkv_join_grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    nkv, C = cfg.kv_heads, q.shape[1]
    parts = [q.reshape(nkv, -1, C), k.reshape(nkv, -1, C), v.reshape(nkv, -1, C)]
    return torch.cat(parts, dim=1).reshape(-1, C)


# transformers 5 names the GPT-NeoX head lm_head in memory; checkpoints on disk (Pythia, and
# transformers 4) call it embed_out, which transformers 5 renames on load. We read both.
_HF_HEAD = {"neox": "lm_head.weight", "gpt2": "lm_head.weight", "llama": "lm_head.weight"}
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


def _names(cfg: ModelConfig) -> dict[str, str]:
    return {"neox": _neox_names, "gpt2": _gpt2_names, "llama": _llama_names}[cfg.arch](cfg)


def state_dict_to_hf(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> a state dict for the model built from `config_to_hf(cfg)`."""
    names = _names(cfg)
    out = {}
    if cfg.arch == "llama":
        for i in range(cfg.num_layers):
            ours = f"blocks.{i}.attn.qkv.weight"
            names[ours] = None  # handled here, not one-to-one
            for name, t in zip(_llama_qkv_names(i), _qkv_split_grouped(sd[ours], cfg)):
                out[name] = t.contiguous()
    for ours, hf in names.items():
        if hf is None:
            continue
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
    names = _names(cfg)
    hf_sd = {_HF_HEAD_ALIASES.get(k, k): v for k, v in hf_sd.items()}
    out = {}
    known = set(names.values())
    if cfg.arch == "llama":
        for i in range(cfg.num_layers):
            qkv = _llama_qkv_names(i)
            for name in qkv:
                if name not in hf_sd:
                    raise KeyError(f"Hugging Face state dict lacks {name!r}")
            out[f"blocks.{i}.attn.qkv.weight"] = _qkv_join_grouped(*(hf_sd[n] for n in qkv), cfg)
            known.update(qkv)
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
    unknown = [k for k in hf_sd if k not in known | {head} and not k.endswith(_HF_IGNORED)]
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
    hf_config.architectures = [HF_CLASS[cfg.arch]]
    hf_config.save_pretrained(path)
    hf_sd = state_dict_to_hf(cfg, sd)
    head = hf_sd.pop(_HF_HEAD[cfg.arch])
    if not cfg.tie_embeddings:  # tied: safetensors refuses shared storage; HF re-ties on load
        hf_sd[hf_head_on_disk(cfg.arch)] = head
    save_file({k: v.detach().cpu().contiguous() for k, v in hf_sd.items()}, os.path.join(path, "model.safetensors"))


def hf_head_on_disk(arch: str) -> str:
    """The untied head's name in a saved HF checkpoint (GPT-NeoX's differs from its in-memory lm_head)."""
    return "embed_out.weight" if arch == "neox" else "lm_head.weight"
