"""Tensor parallelism: Megatron-style split of attention and MLP, applied by DeepSpeed's AutoTP training.

The plan is data — parameter-name patterns to a split style — and DeepSpeed applies it inside
`deepspeed.initialize` (on CPU/gloo too), composing with ZeRO-1/2 and bf16:

    blocks.*.attn.qkv    column-parallel: each rank gets whole heads (rows are laid out per key/value group
                         as [q_0 .. q_{g-1}, k, v], so a contiguous split by rows is a split by groups: a rank
                         holds whole key/value heads with their query heads, hence parallel.tensor must
                         divide model.num_kv_heads), bias split alike
    blocks.*.attn.proj   row-parallel: input features split, outputs all-reduced, bias added once
    blocks.*.mlp.gate    column-parallel (llama's SwiGLU gate, split like fc_in so gate and up columns match)
    blocks.*.mlp.fc_in   column-parallel
    blocks.*.mlp.fc_out  row-parallel

Everything else (embeddings, norms, the output head) is replicated: `GPT.loss` multiplies the head
weight directly (never through an nn.Linear call), so a vocabulary-parallel head would need a different
loss. All ranks of a tensor-parallel group read the same batch (megapile/parallel/layout.py gives them
the same data-parallel rank), which DeepSpeed checks on the first forward.
"""
from __future__ import annotations

import re
from typing import Any

import torch

# (pattern over parameter names, DeepSpeed partition type, dimension of the weight that is split)
TP_PLAN = (
    (r".*\.attn\.qkv\.weight$", "column", 0),
    (r".*\.mlp\.gate\.weight$", "column", 0),
    (r".*\.mlp\.fc_in\.weight$", "column", 0),
    (r".*\.attn\.proj\.weight$", "row", 1),
    (r".*\.mlp\.fc_out\.weight$", "row", 1),
)


def autotp_section(tp: int) -> dict[str, Any]:
    """The DeepSpeed `tensor_parallel` config for `tp` ranks with megapile's plan."""
    specs: dict[str, list[str]] = {}
    for pattern, kind, _ in TP_PLAN:
        specs.setdefault(kind, []).append(pattern)
    return {
        "autotp_size": tp,
        "partition_config": {
            "use_default_specs": False,
            "layer_specs": [{"patterns": patterns, "partition_type": kind} for kind, patterns in specs.items()],
        },
    }


def split_dim(name: str) -> int | None:
    """The dimension along which parameter `name` (a GPT name) is split across tensor-parallel ranks, or None
    when it is replicated. Column-parallel biases are split with their weight's rows; row-parallel biases
    are whole on every rank."""
    for pattern, kind, dim in TP_PLAN:
        if re.match(pattern, name):
            return dim
        if kind == "column" and re.match(pattern.replace(r"\.weight$", r"\.bias$"), name):
            return 0
    return None


def gather_full(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One set of full weights from the per-rank state dicts of a tensor-parallel model (rank order)."""
    full = {}
    for name, first in shards[0].items():
        dim = split_dim(name)
        full[name] = first if dim is None else torch.cat([s[name] for s in shards], dim=dim)
    return full
