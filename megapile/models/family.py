"""A model family as data: what sets GPT-NeoX, GPT-2, Llama, Qwen2 ... apart inside megapile's one transformer.

megapile has one transformer (megapile/model.py). A family is a set of choices in it (norm, MLP, positions,
biases, grouped-query attention) plus the defaults of the choices a config may override, the tensor-parallel
plan, and how its config and weights are named in Hugging Face transformers (its `HFAdapter`). The model,
the config checks, the memory planner, the pipeline, tensor parallelism and the HF import/export read these
fields; none of them compares family names. A new family is one module in this package plus presets.
"""
from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch

from megapile.errors import ConfigError

if TYPE_CHECKING:  # only for annotations: the config module imports this package
    from megapile.config import ModelConfig


@dataclass(frozen=True)
class TensorPlan:
    """Which linears of a block tensor parallelism splits, Megatron-style. Training (DeepSpeed AutoTP),
    pipeline + tensor (megapile/parallel/pipeline.py) and tensor-parallel evaluation all read this one plan.

    column: split by output features; each rank computes its part of the outputs (attention: whole key/value
            groups, as the fused qkv rows are grouped per key/value head), biases split with their rows.
    row:    split by input features; the partial outputs are summed over the group and the bias added once."""

    column: tuple[str, ...] = ("attn.qkv", "mlp.gate", "mlp.fc_in")
    row: tuple[str, ...] = ("attn.proj", "mlp.fc_out")

    def split_dim(self, name: str) -> Optional[int]:
        """The dimension parameter `name` is split along across the tensor ranks, or None when replicated."""
        module, _, kind = name.rpartition(".")
        if _ends_with(module, self.column):
            return 0
        if _ends_with(module, self.row) and kind == "weight":
            return 1
        return None

    def is_row(self, module_name: str) -> bool:
        return _ends_with(module_name, self.row)

    def is_column(self, module_name: str) -> bool:
        return _ends_with(module_name, self.column)


def _ends_with(module: str, suffixes: tuple[str, ...]) -> bool:
    """Whether `module` is one of `suffixes` at a name boundary ("blocks.0.mlp.fc_in", not "x.myfc_in")."""
    return any(module == s or module.endswith("." + s) for s in suffixes)


@dataclass(frozen=True)
class Family:
    """One model family. `defaults` fill the ModelConfig fields a config leaves unset (None)."""

    name: str  # model.arch
    summary: str  # one line for `--help`-style listings and errors
    norm: str  # "layernorm" (weight and bias) | "rmsnorm" (weight only, computed in fp32)
    mlp: str  # "plain": fc_out(act(fc_in x)) | "gated": fc_out(act(gate x) * fc_in x) (SwiGLU with silu)
    positions: str  # "rotary" (rotary_pct of each head's dims) | "learned" (a table of max_seq_len rows)
    qkv_bias: bool  # the fused q/k/v projection has a bias
    linear_bias: bool  # the attention output projection and the MLP linears have biases
    grouped_query: bool  # model.num_kv_heads may be below model.num_heads
    full_rotary: bool  # model.rotary_pct must be 1 (every head dim rotates)
    rope_scaling: bool  # model.rope_scaling (Llama-3 style) is allowed
    defaults: dict[str, Any]  # parallel_residual, tie_embeddings, activation, rotary_pct, rotary_base
    hf: "HFAdapter"
    tensor_plan: TensorPlan = field(default_factory=TensorPlan)

    @property
    def mlp_matrices(self) -> int:
        """Weight matrices of the MLP: up and down, plus the gate when gated."""
        return 3 if self.mlp == "gated" else 2


# ----------------------------------------------------------------------------- Hugging Face


ACT_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
               "silu": "silu", "swish": "silu"}  # every HF name we read; the tanh ones agree to float rounding


class HFAdapter(abc.ABC):
    """How one family is written in Hugging Face transformers: its classes, its config, its parameter names.

    Parameter names map module by module: `top` for modules outside the blocks, `layer` for the prefix of
    block i, `block` for the modules inside a block. A module that HF splits in several (Llama's q/k/v) maps
    to a tuple of names; `to_hf` / `from_hf` then split and join the tensor. megapile/hf/convert.py drives the
    adapter for import (model.init_from, eval/generate of an HF directory) and export (megapile export-hf)."""

    hf_class: str = ""  # the transformers model class, e.g. "LlamaForCausalLM"
    model_type: str = ""  # config.json's model_type
    head_on_disk = "lm_head.weight"  # an untied head's name in a saved checkpoint (in memory it is lm_head)
    top: dict[str, str] = {}
    layer: str = ""  # with {i}
    block: dict[str, Any] = {}  # our module in a block -> HF's (a str, or a tuple of the parts of a fused one)
    act_to_hf = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "silu": "silu"}
    # Where transformers' AutoTokenizer ignores an exported tokenizer.json for this model_type (it builds the
    # family's own tokenizer class instead): what to tell the user, else None.
    tokenizer_note: Optional[str] = None

    @abc.abstractmethod
    def config_to_hf(self, cfg: "ModelConfig"):
        """A transformers config for the same model."""

    @abc.abstractmethod
    def config_from_hf(self, hf_config) -> dict[str, Any]:
        """ModelConfig fields for a transformers config of this family (raise ConfigError when unsupported)."""

    def hf_names(self, name: str) -> tuple[str, ...]:
        """The HF names of our parameter `name` (one, or the parts of a fused parameter). KeyError: none."""
        module, _, kind = name.rpartition(".")
        if module.startswith("blocks."):
            _, i, inner = module.split(".", 2)
            hf = self.block[inner]
            prefix = self.layer.format(i=i)
            return tuple(f"{prefix}.{h}.{kind}" for h in hf) if isinstance(hf, tuple) else (f"{prefix}.{hf}.{kind}",)
        return (f"{self.top[module]}.{kind}",)

    def to_hf(self, cfg: "ModelConfig", name: str, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Our tensor `name` as the HF tensors of `hf_names(name)`, in order."""
        return (t,)

    def from_hf(self, cfg: "ModelConfig", name: str, parts: list[torch.Tensor]) -> torch.Tensor:
        """The HF tensors of `hf_names(name)` as our tensor `name`."""
        return parts[0]

    def common_hf_kwargs(self, cfg: "ModelConfig") -> dict[str, Any]:
        """The transformers config fields GPT-NeoX, Llama and Qwen2 name alike (GPT-2 has names of its own)."""
        return dict(bos_token_id=_token(cfg, 0), eos_token_id=_token(cfg, 2), vocab_size=cfg.padded_vocab_size,
                    hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                    intermediate_size=cfg.ffn_size, hidden_act=self.act_to_hf[cfg.activation],
                    attention_dropout=cfg.dropout, max_position_embeddings=cfg.max_seq_len,
                    initializer_range=cfg.init_std, tie_word_embeddings=cfg.tie_embeddings)


def _token(cfg: "ModelConfig", default: int) -> Optional[int]:
    """Special-token ids belong to the tokenizer, which a ModelConfig does not know: HF's default where it fits
    the vocabulary, else unset."""
    return default if default < cfg.padded_vocab_size else None


def act_from_hf(name: str) -> str:
    if name not in ACT_FROM_HF:
        raise ConfigError(f"activation {name!r} is not supported (known: {', '.join(ACT_FROM_HF)})")
    return ACT_FROM_HF[name]


def replace(family: Family, **changes: Any) -> Family:
    """A family derived from another (Qwen2 from Llama): the same choices except `changes`."""
    return dataclasses.replace(family, **changes)
