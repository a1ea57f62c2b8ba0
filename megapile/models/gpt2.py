"""GPT-2: LayerNorm, a GELU (tanh) MLP, learned positions, sequential residual, biases, tied head.
In transformers: GPT2LMHeadModel, whose c_attn is [all q | all k | all v] and whose Conv1D layers store
their weights transposed, (in, out): regrouped per head and transposed here."""
from __future__ import annotations

from typing import Any

import torch

from megapile.errors import ConfigError
from megapile.models.family import Family, HFAdapter, act_from_hf

_CONV1D = ("attn.qkv.weight", "attn.proj.weight", "mlp.fc_in.weight", "mlp.fc_out.weight")  # ours, stored (in, out)


class GPT2Adapter(HFAdapter):
    hf_class = "GPT2LMHeadModel"
    model_type = "gpt2"
    top = {"embed": "transformer.wte", "pos_embed": "transformer.wpe", "final_norm": "transformer.ln_f"}
    layer = "transformer.h.{i}"
    block = {"ln1": "ln_1", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj", "ln2": "ln_2",
             "mlp.fc_in": "mlp.c_fc", "mlp.fc_out": "mlp.c_proj"}
    act_to_hf = {"gelu": "gelu", "gelu_tanh": "gelu_new", "silu": "silu"}

    def config_to_hf(self, cfg):
        import transformers  # lazy: optional (a test extra), ~0.7 s; eval/generate of a checkpoint skip it

        if cfg.parallel_residual:
            raise ConfigError("GPT-2 in transformers has no parallel residual; set model.parallel_residual: false")
        eos = 50256 if 50256 < cfg.padded_vocab_size else None
        return transformers.GPT2Config(
            bos_token_id=eos, eos_token_id=eos, vocab_size=cfg.padded_vocab_size, n_positions=cfg.max_seq_len,
            n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.ffn_size,
            activation_function=self.act_to_hf[cfg.activation], resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout, layer_norm_epsilon=cfg.norm_eps, initializer_range=cfg.init_std,
            tie_word_embeddings=cfg.tie_embeddings,
        )

    def config_from_hf(self, hf_config) -> dict[str, Any]:
        if hf_config.scale_attn_by_inverse_layer_idx or not hf_config.scale_attn_weights:
            raise ConfigError("GPT-2 variants with non-standard attention scaling are not supported")
        return dict(
            num_layers=hf_config.n_layer,
            hidden_size=hf_config.n_embd,
            num_heads=hf_config.n_head,
            intermediate_size=hf_config.n_inner,
            vocab_size=hf_config.vocab_size,
            max_seq_len=hf_config.n_positions,
            parallel_residual=False,
            tie_embeddings=bool(hf_config.tie_word_embeddings),
            activation=act_from_hf(hf_config.activation_function),
            dropout=float(hf_config.resid_pdrop),
            norm_eps=hf_config.layer_norm_epsilon,
            init_std=hf_config.initializer_range,
        )

    def to_hf(self, cfg, name: str, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if name.endswith(("attn.qkv.weight", "attn.qkv.bias")):
            t = _heads_to_blocked(t, cfg.num_heads)
        return (t.t() if name.endswith(_CONV1D) else t,)

    def from_hf(self, cfg, name: str, parts: list[torch.Tensor]) -> torch.Tensor:
        t = parts[0].t() if name.endswith(_CONV1D) else parts[0]
        return _blocked_to_heads(t, cfg.num_heads) if name.endswith(("attn.qkv.weight", "attn.qkv.bias")) else t


def _blocked_to_heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[all q | all k | all v] along dim 0 -> per head [q, k, v] (our layout)."""
    rest = t.shape[1:]
    return t.reshape(3, num_heads, -1, *rest).transpose(0, 1).reshape(t.shape)


def _heads_to_blocked(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    rest = t.shape[1:]
    return t.reshape(num_heads, 3, -1, *rest).transpose(0, 1).reshape(t.shape)


GPT2 = Family(
    name="gpt2",
    summary="GPT-2: LayerNorm, GELU (tanh) MLP, learned positions, sequential residual, biases, tied head",
    norm="layernorm", mlp="plain", positions="learned", qkv_bias=True, linear_bias=True,
    grouped_query=False, full_rotary=False, rope_scaling=False,
    defaults=dict(parallel_residual=False, tie_embeddings=True, activation="gelu_tanh", rotary_pct=0.25,
                  rotary_base=10000.0),  # rotary unused: learned positions
    hf=GPT2Adapter(),
)
