"""Tensor parallelism: the model family's plan (megapile/models/family.py `TensorPlan`) applied by DeepSpeed's
AutoTP training, by pipeline stages (`shard_block`) and read by the checkpoint slices.

The plan is data: which linears of a block are column-parallel (split by output features: attn.qkv, whole
key/value groups per rank as its rows are grouped per key/value head, hence parallel.tensor must divide
model.num_kv_heads; the MLP's fc_in and gate alike, so gate and up columns match) and which row-parallel
(split by input features, outputs all-reduced, bias added once: attn.proj, mlp.fc_out). DeepSpeed applies it
inside `deepspeed.initialize` (on CPU/gloo too), composing with ZeRO-1/2 and bf16.

Everything else (embeddings, norms, the output head) is replicated: `GPT.loss` multiplies the head
weight directly (never through an nn.Linear call), so a vocabulary-parallel head would need a different
loss. All ranks of a tensor-parallel group read the same batch (megapile/parallel/layout.py gives them
the same data-parallel rank), which DeepSpeed checks on the first forward.
"""
from __future__ import annotations

import re
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from megapile.models import TensorPlan


def autotp_section(tp: int, plan: TensorPlan) -> dict[str, Any]:
    """The DeepSpeed `tensor_parallel` config for `tp` ranks with the family's plan."""
    def patterns(modules: tuple[str, ...]) -> list[str]:
        return [rf".*\.{re.escape(m)}\.weight$" for m in modules]

    return {
        "autotp_size": tp,
        "partition_config": {
            "use_default_specs": False,
            "layer_specs": [{"patterns": patterns(plan.column), "partition_type": "column"},
                            {"patterns": patterns(plan.row), "partition_type": "row"}],
        },
    }


def shard_block(block: nn.Module, group, plan: TensorPlan) -> None:
    """Split a block over the tensor-parallel `group` with DeepSpeed's AutoTP layers, by the plan AutoTP reads
    without pipelining. Split parameters are marked `tensor_model_parallel`, so the global gradient norm counts
    them on every tensor rank and the replicated ones once."""
    # lazy: importing DeepSpeed prints to stdout, and `megapile config show` (which reads autotp_section) prints YAML
    from deepspeed.module_inject.layers import LinearAllreduce, LinearLayer, set_autotp_mode

    set_autotp_mode(training=True)
    block.attn.dropout_stream = dist.get_rank(group)  # the tensor rank: each rank drops its own heads' probabilities
    for name, module in list(block.named_modules()):
        if not isinstance(module, nn.Linear) or not (plan.is_column(name) or plan.is_row(name)):
            continue
        owner, _, leaf = name.rpartition(".")
        split = LinearLayer(module, group) if plan.is_column(name) else LinearAllreduce(module, group)
        setattr(block.get_submodule(owner), leaf, split)
        for kind, p in split.named_parameters(recurse=False):
            if p is not None and plan.split_dim(f"{name}.{kind}") is not None:
                p.tensor_model_parallel = True


def gather_full(shards: list[dict[str, torch.Tensor]], plan: TensorPlan) -> dict[str, torch.Tensor]:
    """One set of full weights from the per-rank state dicts of a tensor-parallel model (rank order)."""
    full = {}
    for name, first in shards[0].items():
        dim = plan.split_dim(name)
        full[name] = first if dim is None else torch.cat([s[name] for s in shards], dim=dim)
    return full
