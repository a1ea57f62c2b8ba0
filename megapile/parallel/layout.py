"""How the world's ranks split into tensor × pipeline × data parallel groups, checked in one place.

Rank order is DeepSpeed's (`PipeModelDataParallelTopology`, axes pipe, data, model), which is also the
order of AutoTP's (data, tensor) mesh when there is no pipeline:

    rank = stage × (data × tensor) + data_rank × tensor + tensor_rank

so the ranks of one tensor-parallel group are neighbours (one node, fast links) and read the same batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional

from megapile.checkpoint.state_file import RunState
from megapile.config import Config, ConfigError, ModelConfig

TP_ZERO_STAGES = (1, 2)  # AutoTP training is tested with these; ZeRO-0's grad-norm path is TP-unaware
PP_ZERO_STAGES = (0, 1)  # DeepSpeed's PipelineEngine refuses ZeRO-2/3
ZERO_STAGE_KEY = "parallel.zero_stage (zero_optimization.stage in a DeepSpeed JSON)"


@dataclass(frozen=True)
class Layout:
    world: int
    tensor: int
    pipeline: int
    data: int

    def tensor_rank(self, rank: int) -> int:
        return rank % self.tensor

    def data_rank(self, rank: int) -> int:
        return (rank // self.tensor) % self.data

    def stage(self, rank: int) -> int:
        return rank // (self.tensor * self.data)

    def seed_rank(self, rank: int) -> int:
        """What seeds `rank`'s random streams: shared by a tensor-parallel group, whose ranks must draw the same
        dropout masks on the activations they all hold (the model's attention dropout forks per tensor rank)."""
        return rank // self.tensor

    def as_dict(self) -> dict[str, int]:
        return {"tensor": self.tensor, "pipeline": self.pipeline, "data": self.data}

    def describe(self) -> str:
        return f"TP {self.tensor} × PP {self.pipeline} × DP {self.data}"


def resolve_layout(cfg: Config, world_size: int) -> Layout:
    """The layout `parallel` asks for on `world_size` ranks; ConfigError (one line) when it cannot run. ZeRO's
    settings are those resolved from the YAML and the DeepSpeed JSON (`ds_config.apply_ds_json`)."""
    par = cfg.parallel
    tp, pp, stage = par.tensor, par.pipeline, par.zero_stage or 0
    offloaded = [k for k in ("offload_optimizer", "offload_params") if getattr(par, k) not in (None, "none")]
    if (tp > 1 or pp > 1) and offloaded:
        raise ConfigError(f"parallel.{offloaded[0]} is supported with ZeRO data parallelism only (parallel.tensor "
                          f"and parallel.pipeline 1), got tensor {tp} × pipeline {pp}")
    reason = layout_refusal(cfg.model, world_size, tp, pp, stage)  # the training dtype: ds_config, once resolved
    if reason is not None:
        raise ConfigError(reason)
    if pp > 1:
        _check_pipeline_layers(cfg, pp)
    elif par.pipeline_layers is not None and par.pipeline_layers != [cfg.model.num_layers]:
        raise ConfigError("parallel.pipeline_layers is set but parallel.pipeline is 1")
    return Layout(world_size, tp, pp, world_size // (tp * pp))


def layout_refusal(model: ModelConfig, world_size: int, tensor: int, pipeline: int, zero_stage: int,
                   dtype: Optional[str] = None) -> Optional[str]:
    """Why training refuses `model` split tensor × pipeline on `world_size` ranks with this ZeRO stage (one line),
    or None when it runs. The one rule both training (`resolve_layout`) and `megapile plan` apply, so plan never
    lists a layout training refuses. `dtype` None: the training dtype is not resolved yet (its rule is
    `precision_refusal`, which ds_config applies once it is)."""
    return next(_refusals(model, world_size, tensor, pipeline, zero_stage, dtype), None)


def _refusals(model: ModelConfig, world: int, tp: int, pp: int, stage: int, dtype: Optional[str]) -> Iterator[str]:
    """Every reason to refuse, in the order training reports them (lazily: the first is all that is asked for)."""
    # grouped-query attention: no number of ranks splits key/value heads that tp does not divide; with
    # num_kv_heads == num_heads the num_heads check below says the same
    if tp > 1 and model.kv_heads < model.num_heads and model.kv_heads % tp:
        yield (f"model.num_kv_heads ({model.kv_heads}) must be divisible by parallel.tensor ({tp}): "
               "each tensor-parallel rank holds whole key/value heads")
    if world % (tp * pp):
        yield (f"parallel.tensor ({tp}) × parallel.pipeline ({pp}) = {tp * pp} does not divide "
               f"the world size ({world})")
    if tp > 1 and pp > 1 and stage != 1:
        yield f"parallel.tensor > 1 with parallel.pipeline > 1 needs {ZERO_STAGE_KEY} 1, got {stage}"
    if model.compile and (tp > 1 or pp > 1):
        yield ("model.compile is supported with ZeRO data parallelism only (parallel.tensor and "
               "parallel.pipeline 1); set model.compile: false")
    if tp > 1:
        yield from _tensor_refusals(model, tp, stage)
    if pp > 1:
        yield from _pipeline_refusals(model, pp, stage)
    if dtype is not None:
        reason = precision_refusal(pp, stage, dtype)
        if reason is not None:
            yield reason


def _tensor_refusals(model: ModelConfig, tp: int, stage: int) -> Iterator[str]:
    if model.num_heads % tp:
        yield (f"model.num_heads ({model.num_heads}) must be divisible by parallel.tensor ({tp}): "
               "each tensor-parallel rank holds whole attention heads")
    if model.ffn_size % tp:
        yield f"the MLP width ({model.ffn_size}) must be divisible by parallel.tensor ({tp})"
    if stage not in TP_ZERO_STAGES:
        yield f"parallel.tensor > 1 needs {ZERO_STAGE_KEY} 1 or 2, got {stage}"


def _pipeline_refusals(model: ModelConfig, pp: int, stage: int) -> Iterator[str]:
    if stage not in PP_ZERO_STAGES:
        yield (f"parallel.pipeline > 1 needs {ZERO_STAGE_KEY} 0 or 1, got {stage}: DeepSpeed's "
               "pipeline engine does not support ZeRO-2/3")
    if model.num_layers < pp:
        yield f"parallel.pipeline ({pp}) is more stages than model.num_layers ({model.num_layers})"


def precision_refusal(pipeline: int, zero_stage: int, dtype: str) -> Optional[str]:
    """The one layout rule that depends on the training dtype (without the source prefix ds_config adds)."""
    if pipeline > 1 and zero_stage == 0 and dtype == "bf16":  # train.dtype auto is bf16 on GPUs
        return ("parallel.pipeline > 1 in bf16 needs zero_optimization.stage 1 (parallel.zero_stage: 1): DeepSpeed's "
                "ZeRO-0 pipeline cannot load its own bf16 checkpoints (it saves the bf16 optimizer's state as one "
                "dict and loads it as a per-rank list)")
    return None


def _check_pipeline_layers(cfg: Config, pp: int) -> None:
    model, split = cfg.model, cfg.parallel.pipeline_layers
    if split is not None and (len(split) != pp or any(n < 0 for n in split) or sum(split) != model.num_layers):
        raise ConfigError(f"parallel.pipeline_layers {split} must give {pp} non-negative block counts "
                          f"summing to model.num_layers ({model.num_layers})")


def pad_vocab_for_tensor(cfg: Config) -> None:
    """Pad the vocabulary to a multiple of 128 × parallel.tensor rows, as GPT-NeoX/Megatron do for their row-split
    embedding (the released Pythia 6.9B/12B, trained at tensor 2, have 50432 rows; megapile's tensor parallelism
    keeps the embedding and head whole, so this only keeps their shapes): model.pad_vocab_multiple becomes
    lcm(itself, 128 × parallel.tensor). The padding rows are never scored (`GPT.loss`, sampling) and a checkpoint
    resumes onto another padding (megapile/checkpoint/fragments.py), so one config runs, and resumes, at any
    parallel.tensor."""
    tensor = cfg.parallel.tensor
    if tensor > 1:
        cfg.model.pad_vocab_multiple = math.lcm(cfg.model.pad_vocab_multiple, 128 * tensor)


def check_same_layout(saved: RunState, layout: Layout, zero_stage: int, path: str) -> None:
    """For checkpoints written before they carried slices (DeepSpeed's files): tensor/pipeline ones hold per-rank
    pieces of the model and resume only on the layout that wrote them; plain data-parallel ones pass (megapile
    reshards them to any world size and ZeRO stage through full tensors)."""
    old_tp, old_pp = saved.tensor, saved.pipeline
    if old_tp == old_pp == layout.tensor == layout.pipeline == 1:
        return
    before = (old_tp, old_pp, saved.world_size, saved.zero_stage)
    now = (layout.tensor, layout.pipeline, layout.world, zero_stage)
    if before == now:
        return
    raise ConfigError(
        f"checkpoint {path} was saved with tensor {old_tp} × pipeline {old_pp} on {before[2]} ranks, "
        f"ZeRO-{before[3]}; "
        f"this run is tensor {now[0]} × pipeline {now[1]} on {now[2]} ranks, ZeRO-{now[3]}: a tensor- or "
        "pipeline-parallel checkpoint written before checkpoints carried slices resumes only on its own layout "
        "(`megapile ckpt consolidate` turns it into "
        "full weights)"
    )
