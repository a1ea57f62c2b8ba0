"""Pipeline parallelism: the plain GPT as a DeepSpeed `PipelineModule`, trained with its 1F1B schedule.

The model is cut into a flat list of layers, each a thin wrapper around the very modules of `model.GPT`
(nothing in model.py changes):

    0        TokenEmbedding   embed                      (a TiedLayerSpec "embed" when embeddings are tied)
    1        Positions        pos_embed (gpt2), embed dropout
    2..L+1   BlockLayer       blocks.{i}
    L+2      FinalNorm        final_norm
    L+3      Head             head, or the tied embedding's weight (TiedLayerSpec "embed", forward_fn=_tied_head)

Each stage builds only the layers it owns, on the meta device first, then fills them with
`GPT.init_weights`, whose values depend only on (seed, parameter name): a pipeline run starts from exactly
the weights of a one-process run without ever holding the whole model (DeepSpeed's `seed_layers` is not
used; it fails on Python 3.11 and would give other weights anyway).

Stages pass the (B, T, C) activation; the last stage returns the logits over the real vocabulary (padding
rows excluded, as `GPT.loss` does) and `loss_fn` takes the mean cross-entropy.

With `parallel.tensor` > 1 as well, DeepSpeed's pipeline grid (`PipeModelDataParallelTopology`, axes pipe,
data, model) provides the tensor-parallel groups, and each stage splits its blocks with DeepSpeed's
column/row-parallel layers (`tensor.shard_block`), by the family's plan that AutoTP reads too, with the per-rank
attention-dropout stream that tensor parallelism alone sets (`parallelize.prepare_tensor_parallel`).
"""
from __future__ import annotations

import functools
import re
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

from megapile.config import Config, ModelConfig
from megapile.model import GPT, meta_gpt, rotary_cos_sin, uses_rotary
from megapile.parallel.tensor import shard_block

FIRST_BLOCK = 2  # layer index of blocks.0 in the pipeline's layer list


# ----------------------------------------------------------------------------- stage layers


def _owned(cfg: ModelConfig, seed: int, names: list[str]) -> list[nn.Module]:
    """Fresh copies of the GPT submodules `names` (e.g. "blocks.3"), materialised on CPU and initialised
    exactly as `build_model` initialises them: `GPT.init_weights` runs on a stand-in module that holds only
    these submodules under their full names, so each parameter draws from its own (seed, name) stream."""
    whole = meta_gpt(cfg)
    holder = nn.Module()
    holder.cfg = cfg
    parts = []
    for name in names:
        module = whole.get_submodule(name)
        module.to_empty(device="cpu")
        parent, _, leaf = name.rpartition(".")
        node = holder
        for piece in filter(None, parent.split(".")):
            if not hasattr(node, piece):
                node.add_module(piece, nn.Module())
            node = getattr(node, piece)
        node.add_module(leaf, module)
        parts.append(module)
    GPT.init_weights(holder, seed)  # uses only cfg, get_submodule and named_parameters
    return parts


class TokenEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig, seed: int):
        super().__init__()
        (self.embed,) = _owned(cfg, seed, ["embed"])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)  # (B, T) -> (B, T, C)


class Positions(nn.Module):
    """Learned positions (gpt2) and the embedding dropout; no parameters for rotary families."""

    def __init__(self, cfg: ModelConfig, seed: int):
        super().__init__()
        self.max_seq_len = cfg.max_seq_len
        learned = cfg.family.positions == "learned"
        (self.pos_embed,) = _owned(cfg, seed, ["pos_embed"]) if learned else (None,)
        self.embed_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        if T > self.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds model.max_seq_len {self.max_seq_len}")
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(T, device=x.device))
        return self.embed_dropout(x)


class TensorGroup:
    """The tensor-parallel process group of this rank, known only once the pipeline module's grid exists."""

    group = None


class BlockLayer(nn.Module):
    """blocks.{index}; rotary tables are recomputed per stage (cheap) so only the activation travels.
    With tensor parallelism too, the block's linears are split Megatron-style (see `shard_block`)."""

    def __init__(self, cfg: ModelConfig, seed: int, index: int, tensor: Optional[TensorGroup] = None):
        super().__init__()
        self.cfg = cfg
        (self.block,) = _owned(cfg, seed, [f"blocks.{index}"])
        if tensor is not None:
            shard_block(self.block, tensor.group, cfg.family.tensor_plan)
        self.use_rotary = uses_rotary(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rope = rotary_cos_sin(self.cfg, x.shape[1], x.device) if self.use_rotary else None
        return self.block(x, rope)


class FinalNorm(nn.Module):
    def __init__(self, cfg: ModelConfig, seed: int):
        super().__init__()
        (self.final_norm,) = _owned(cfg, seed, ["final_norm"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_norm(x)


class Head(nn.Module):
    def __init__(self, cfg: ModelConfig, seed: int):
        super().__init__()
        self.vocab_size = cfg.vocab_size
        (self.head,) = _owned(cfg, seed, ["head"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.head.weight[: self.vocab_size])  # (B, T, vocab): padding rows never scored


def _tied_head(vocab_size: int, module: TokenEmbedding, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, module.embed.weight[:vocab_size])


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (targets == -100 ignored), in fp32 like `GPT.loss`."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


# ----------------------------------------------------------------------------- the module


def layer_specs(cfg: ModelConfig, seed: int, tensor: Optional[TensorGroup] = None) -> list:
    if cfg.tie_embeddings:
        first = TiedLayerSpec("embed", TokenEmbedding, cfg, seed, tied_weight_attr=["embed.weight"])
        last = TiedLayerSpec("embed", TokenEmbedding, cfg, seed, tied_weight_attr=["embed.weight"],
                             forward_fn=functools.partial(_tied_head, cfg.vocab_size))
    else:
        first, last = LayerSpec(TokenEmbedding, cfg, seed), LayerSpec(Head, cfg, seed)
    blocks = [LayerSpec(BlockLayer, cfg, seed, i, tensor) for i in range(cfg.num_layers)]
    return [first, LayerSpec(Positions, cfg, seed), *blocks, LayerSpec(FinalNorm, cfg, seed), last]


def build_pipeline(cfg: Config, num_stages: int):
    """A `PipelineModule` of `cfg.model` over `num_stages` stages, initialised from `cfg.train.seed`; with
    `parallel.tensor` > 1 each stage's blocks are also split over that many ranks."""
    model_cfg = cfg.model
    tp = cfg.parallel.tensor
    tensor = TensorGroup() if tp > 1 else None
    topology = None
    if tp > 1:  # axes pipe, data, model: rank = stage * (data * tensor) + data_rank * tensor + tensor_rank
        topology = PipeModelDataParallelTopology(num_pp=num_stages, num_mp=tp,
                                                 num_dp=dist.get_world_size() // (num_stages * tp))

    class GPTPipeline(PipelineModule):
        def _build(self) -> None:
            if tensor is not None:
                tensor.group = self._grid.get_slice_parallel_group()
            super()._build()

        def _count_layer_params(self) -> list[int]:
            # DeepSpeed builds every layer on every rank to count; the meta model counts for free.
            return _layer_param_counts(model_cfg)

        def _partition_layers(self, method: str = "uniform") -> None:
            if cfg.parallel.pipeline_layers is None:
                return super()._partition_layers(method)
            self.parts = explicit_parts(cfg.parallel.pipeline_layers)
            stage = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    checkpointing = model_cfg.activation_checkpointing
    return GPTPipeline(
        layers=layer_specs(model_cfg, cfg.train.seed, tensor),
        num_stages=None if topology is not None else num_stages,
        topology=topology,
        loss_fn=lm_loss,
        partition_method=cfg.parallel.pipeline_partition,
        # Blocks only: their input is a float activation. Non-reentrant torch checkpointing, which also
        # passes gradients through inputs that do not require them.
        activation_checkpoint_interval=1 if checkpointing else 0,
        activation_checkpoint_func=functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False),
        checkpointable_layers=["BlockLayer"],
    )


def explicit_parts(blocks_per_stage: list[int]) -> list[int]:
    """Layer boundaries for a given split of the transformer blocks: the embeddings go with the first stage,
    the final norm and head with the last."""
    parts = [0]
    for i, n in enumerate(blocks_per_stage):
        parts.append(parts[-1] + n + (FIRST_BLOCK if i == 0 else 0))
    parts[-1] += 2  # FinalNorm, Head
    return parts


def _layer_param_counts(cfg: ModelConfig) -> list[int]:
    whole = meta_gpt(cfg)
    count = lambda m: 0 if m is None else sum(p.numel() for p in m.parameters())  # noqa: E731
    blocks = [count(b) for b in whole.blocks.values()]
    head = count(whole.embed) if cfg.tie_embeddings else count(whole.head)
    return [count(whole.embed), count(whole.pos_embed), *blocks, count(whole.final_norm), head]


# ----------------------------------------------------------------------------- names


_LAYER = re.compile(r"^(\d+)\.(.*)$")


def gpt_name(pipe_name: str, num_layers: int) -> Optional[str]:
    """The `model.GPT` name of a pipeline parameter ("3.block.attn.qkv.weight" -> "blocks.1.attn.qkv.weight",
    "tied_modules.embed.embed.weight" -> "embed.weight"); None for anything else."""
    if pipe_name.startswith("tied_modules."):
        return pipe_name.split(".", 2)[2]
    m = _LAYER.match(pipe_name)
    if not m:
        return None
    index, local = int(m.group(1)), m.group(2)
    return layer_name(index, local)


def layer_name(index: int, local: str) -> str:
    """The GPT name of parameter `local` of pipeline layer `index`."""
    if local.startswith("block."):
        return f"blocks.{index - FIRST_BLOCK}.{local[len('block.'):]}"
    return local
