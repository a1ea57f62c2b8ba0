"""GPT-NeoX / Pythia: LayerNorm, a GELU MLP, partial rotary, parallel residual, biases everywhere.
In transformers: GPTNeoXForCausalLM, whose query_key_value is per head [q, k, v] like ours (copied as is)."""
from __future__ import annotations

from typing import Any

from megapile.errors import ConfigError
from megapile.models.family import Family, HFAdapter, act_from_hf


class NeoXAdapter(HFAdapter):
    hf_class = "GPTNeoXForCausalLM"
    model_type = "gpt_neox"
    # transformers 5 names the head lm_head in memory; checkpoints on disk (Pythia, transformers 4) embed_out
    head_on_disk = "embed_out.weight"
    top = {"embed": "gpt_neox.embed_in", "final_norm": "gpt_neox.final_layer_norm"}
    layer = "gpt_neox.layers.{i}"
    block = {"ln1": "input_layernorm", "attn.qkv": "attention.query_key_value", "attn.proj": "attention.dense",
             "ln2": "post_attention_layernorm", "mlp.fc_in": "mlp.dense_h_to_4h", "mlp.fc_out": "mlp.dense_4h_to_h"}

    def config_to_hf(self, cfg):
        import transformers  # lazy: optional (a test extra), ~0.7 s; eval/generate of a checkpoint skip it

        rope = {"rope_type": "default", "rope_theta": cfg.rotary_base, "partial_rotary_factor": cfg.rotary_pct}
        return transformers.GPTNeoXConfig(**self.common_hf_kwargs(cfg), hidden_dropout=cfg.dropout,
                                          layer_norm_eps=cfg.norm_eps, use_parallel_residual=cfg.parallel_residual,
                                          rope_parameters=rope, attention_bias=True)

    def config_from_hf(self, hf_config) -> dict[str, Any]:
        rope = dict(getattr(hf_config, "rope_parameters", None) or {})
        if rope.get("rope_type", "default") != "default":
            raise ConfigError(f"rope_type {rope['rope_type']!r} is not supported; only plain rotary")
        if not getattr(hf_config, "attention_bias", True):
            raise ConfigError("GPT-NeoX with attention_bias=False is not supported")
        return dict(
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
            activation=act_from_hf(hf_config.hidden_act),
            dropout=float(hf_config.hidden_dropout),
            norm_eps=hf_config.layer_norm_eps,
            init_std=hf_config.initializer_range,
        )


NEOX = Family(
    name="neox",
    summary="GPT-NeoX/Pythia: LayerNorm, GELU MLP, partial rotary, parallel residual, biases, untied head",
    norm="layernorm", mlp="plain", positions="rotary", qkv_bias=True, linear_bias=True,
    grouped_query=False, full_rotary=False, rope_scaling=False,
    defaults=dict(parallel_residual=True, tie_embeddings=False, activation="gelu", rotary_pct=0.25,
                  rotary_base=10000.0),
    hf=NeoXAdapter(),
)
