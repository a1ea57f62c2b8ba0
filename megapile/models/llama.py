"""Llama: RMSNorm, a SwiGLU MLP, grouped-query attention, full rotary (optionally Llama-3 scaled), no biases.
In transformers: LlamaForCausalLM, whose q_proj, k_proj, v_proj are three matrices where ours is one, grouped
per key/value head as [q_0 .. q_{g-1}, k, v] (HF's repeat_kv order): split and regrouped here.
gate_proj/up_proj/down_proj are mlp.gate/fc_in/fc_out."""
from __future__ import annotations

from typing import Any

import torch

from megapile.errors import ConfigError
from megapile.models.family import Family, HFAdapter, act_from_hf


class LlamaAdapter(HFAdapter):
    hf_class = "LlamaForCausalLM"
    model_type = "llama"
    top = {"embed": "model.embed_tokens", "final_norm": "model.norm"}
    layer = "model.layers.{i}"
    block = {"ln1": "input_layernorm", "attn.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
             "attn.proj": "self_attn.o_proj", "ln2": "post_attention_layernorm", "mlp.gate": "mlp.gate_proj",
             "mlp.fc_in": "mlp.up_proj", "mlp.fc_out": "mlp.down_proj"}

    def config_to_hf(self, cfg):
        import transformers  # lazy: optional (a test extra), ~0.7 s; eval/generate of a checkpoint skip it

        if cfg.parallel_residual:
            raise ConfigError("Llama in transformers has no parallel residual; set model.parallel_residual: false")
        return transformers.LlamaConfig(
            **self.common_hf_kwargs(cfg), num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim,
            rms_norm_eps=cfg.norm_eps, rope_parameters=self.rope_to_hf(cfg), attention_bias=False, mlp_bias=False)

    def rope_to_hf(self, cfg) -> dict[str, Any]:
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rotary_base}
        if cfg.rope_scaling is not None:
            sc = cfg.rope_scaling
            rope.update(rope_type="llama3", factor=sc.factor, low_freq_factor=sc.low_freq_factor,
                        high_freq_factor=sc.high_freq_factor, original_max_position_embeddings=sc.original_max_seq_len)
        return rope

    def check_hf_biases(self, hf_config) -> None:
        if getattr(hf_config, "attention_bias", False) or getattr(hf_config, "mlp_bias", False):
            raise ConfigError("Llama with attention_bias or mlp_bias is not supported")

    def config_from_hf(self, hf_config) -> dict[str, Any]:
        self.check_hf_biases(hf_config)
        rope = dict(getattr(hf_config, "rope_parameters", None) or {})
        rope_type = rope.get("rope_type", "default")
        if rope_type not in ("default", "llama3"):
            raise ConfigError(f"rope_type {rope_type!r} is not supported; only plain rotary and llama3 scaling")
        heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
        if head_dim * heads != hf_config.hidden_size:
            raise ConfigError(f"{self.hf_class} with head_dim {head_dim} x {heads} heads != hidden_size "
                              f"{hf_config.hidden_size} is not supported")
        scaling = None
        if rope_type == "llama3":
            scaling = dict(factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
                           high_freq_factor=float(rope["high_freq_factor"]),
                           original_max_seq_len=int(rope["original_max_position_embeddings"]))
        return dict(
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
            activation=act_from_hf(hf_config.hidden_act),
            dropout=float(hf_config.attention_dropout),
            norm_eps=hf_config.rms_norm_eps,
            init_std=hf_config.initializer_range,
        )

    def to_hf(self, cfg, name: str, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return split_grouped_qkv(t, cfg) if ".attn.qkv." in name else (t,)

    def from_hf(self, cfg, name: str, parts: list[torch.Tensor]) -> torch.Tensor:
        return join_grouped_qkv(*parts, cfg) if ".attn.qkv." in name else parts[0]


def split_grouped_qkv(t: torch.Tensor, cfg) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Our fused qkv weight (nkv (g + 2) hs, C) or bias (nkv (g + 2) hs,) -> HF's q (nh hs, ...), k and v
    (nkv hs, ...)."""
    g, hs, rest = cfg.kv_groups, cfg.head_dim, t.shape[1:]
    q, k, v = t.reshape(cfg.kv_heads, (g + 2) * hs, *rest).split([g * hs, hs, hs], dim=1)
    return tuple(x.reshape(-1, *rest).contiguous() for x in (q, k, v))


def join_grouped_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg) -> torch.Tensor:
    nkv, rest = cfg.kv_heads, q.shape[1:]
    return torch.cat([x.reshape(nkv, -1, *rest) for x in (q, k, v)], dim=1).reshape(-1, *rest)


LLAMA = Family(
    name="llama",
    summary="Llama: RMSNorm, SwiGLU MLP, grouped-query attention, full rotary, no biases, untied head",
    norm="rmsnorm", mlp="gated", positions="rotary", qkv_bias=False, linear_bias=False,
    grouped_query=True, full_rotary=True, rope_scaling=True,
    defaults=dict(parallel_residual=False, tie_embeddings=False, activation="silu", rotary_pct=1.0,
                  rotary_base=10000.0),
    hf=LlamaAdapter(),
)
