"""Qwen2 / Qwen2.5: Llama's layout with biases on the q/k/v projections (only there) and a rotary base of 1e6.
In transformers: Qwen2ForCausalLM, named like Llama (q_proj/k_proj/v_proj, now with biases, split and regrouped
per key/value head the same way). Sliding-window attention (off in every released Qwen2.5) is refused."""
from __future__ import annotations

from typing import Any

from megapile.errors import ConfigError
from megapile.models.family import replace
from megapile.models.llama import LLAMA, LlamaAdapter


class Qwen2Adapter(LlamaAdapter):
    hf_class = "Qwen2ForCausalLM"
    model_type = "qwen2"
    # transformers 5 always builds Qwen2Tokenizer (Qwen's own pre-tokenizer) for model_type qwen2, whatever
    # tokenizer_config.json says: right for Qwen's tokenizer, wrong for one trained here.
    tokenizer_note = ("AutoTokenizer builds Qwen2Tokenizer for every qwen2 model; unless this is Qwen's own "
                      "tokenizer, load it with PreTrainedTokenizerFast.from_pretrained({output!r})")

    def config_to_hf(self, cfg):
        import transformers  # lazy: optional (a test extra), ~0.7 s; eval/generate of a checkpoint skip it

        if cfg.parallel_residual:
            raise ConfigError("Qwen2 in transformers has no parallel residual; set model.parallel_residual: false")
        if cfg.num_heads * cfg.head_dim != cfg.hidden_size:
            raise ConfigError("Qwen2 in transformers needs model.hidden_size = num_heads x head size")
        return transformers.Qwen2Config(**self.common_hf_kwargs(cfg), num_key_value_heads=cfg.kv_heads,
                                        rms_norm_eps=cfg.norm_eps, rope_parameters=self.rope_to_hf(cfg),
                                        use_sliding_window=False)

    def check_hf_biases(self, hf_config) -> None:
        """Qwen2's biases are fixed by the architecture (q/k/v only); there is no switch to check."""

    def config_from_hf(self, hf_config) -> dict[str, Any]:
        if getattr(hf_config, "use_sliding_window", False):
            raise ConfigError("Qwen2 with use_sliding_window is not supported (full attention only)")
        kwargs = super().config_from_hf(hf_config)
        if kwargs["rope_scaling"] is not None:
            raise ConfigError("Qwen2 with rope scaling is not supported; only plain rotary")
        return kwargs


QWEN2 = replace(
    LLAMA,
    name="qwen2",
    summary="Qwen2/Qwen2.5: Llama's layout with q/k/v biases and rotary base 1e6",
    qkv_bias=True,
    rope_scaling=False,
    defaults=dict(LLAMA.defaults, rotary_base=1_000_000.0),
    hf=Qwen2Adapter(),
)
