"""Turn the plain model into a trainable DeepSpeed engine, in one visible order, for every layout.

    1. model parallelism: pipeline stages (each builds only its own layers, tensor-split inside with TP too)
       or tensor parallelism (DeepSpeed's AutoTP splits the linears inside `deepspeed.initialize`)
    2. activation checkpointing: the model's own (`model.activation_checkpointing`, the pipeline's per block)
    3. torch.compile per block (`model.compile`; ZeRO data parallelism only, refused otherwise)
    4. one AdamW and one LR schedule over the parameters this rank trains
    5. ZeRO data parallelism: the one `deepspeed.initialize`, with the generated DeepSpeed config
    6. the step guard (global norm, clip, skip on non-finite) where DeepSpeed does not apply it itself

model.py knows nothing of any of this.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import deepspeed
import torch
from deepspeed.utils import groups

from megapile.config import Config
from megapile.model import GPT, Attention, compile_blocks, param_groups
from megapile.parallel.ds_config import optimizer_offloaded
from megapile.parallel.layout import Layout
from megapile.parallel.pipeline import build_pipeline
from megapile.parallel.step_guard import guard_plain_step, needs_guard, without_clipping
from megapile.training.optim import build_optimizer, build_scheduler


@dataclass
class TrainState:
    """What the training loop drives: the engine (module, optimizer and data-parallel reduction inside), its
    optimizer and LR schedule, and how the optimizer numbers the plain model's parameters."""

    engine: Any  # deepspeed.DeepSpeedEngine or its PipelineEngine
    optimizer: Any
    scheduler: torch.optim.lr_scheduler.LRScheduler
    param_order: list[str]  # GPT parameter names in optimizer order (how a ZeRO-0 checkpoint numbers them)

    @property
    def pipelined(self) -> bool:
        return is_pipelined(self.engine)


def is_pipelined(engine) -> bool:
    """A PipelineEngine: it runs a global batch's micro-batches itself (`train_batch`, `eval_batch`)."""
    return bool(getattr(engine, "pipeline_parallelism", False))


def parallelize(cfg: Config, layout: Layout, model: GPT, ds_config: dict[str, Any]) -> TrainState:
    """`model`: the plain GPT, materialised and initialised; on the meta device when `layout.pipeline` > 1 (each
    stage then builds its own layers). `ds_config`: `ds_config.resolve_ds_config`'s output."""
    param_order = _optimizer_order(model, cfg.optim.weight_decay)  # before anything renames parameters
    mpu = None
    if layout.pipeline > 1:  # 1.
        model = build_pipeline(cfg, layout.pipeline)
    elif layout.tensor > 1:
        mpu = prepare_tensor_parallel(model, layout.tensor)
    if cfg.model.compile:  # 3. lazily: each block's graph is traced on its first forward
        compile_blocks(model)
    optimizer = build_optimizer(param_groups(model, cfg.optim.weight_decay), cfg.optim,  # 4.
                                cpu_offload=optimizer_offloaded(ds_config))
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    guarded = needs_guard(ds_config)  # ZeRO-0 in fp32: megapile's norm, clipping and non-finite skip
    engine, optimizer, _, scheduler = deepspeed.initialize(  # 5.
        model=model, optimizer=optimizer, lr_scheduler=scheduler, mpu=mpu,
        config=without_clipping(ds_config) if guarded else ds_config,
    )
    if guarded:  # 6. a pipeline's norm sums over its stages; a tied weight counts on its owning stage only
        group = engine.grid.get_pipe_parallel_group() if layout.pipeline > 1 else None
        guard_plain_step(optimizer, cfg.optim.grad_clip, engine.device, group)
    return TrainState(engine, optimizer, scheduler, param_order)


def _optimizer_order(model: GPT, weight_decay: float) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in param_groups(model, weight_decay) for p in g["params"]]


def init_groups(tp: int):
    """DeepSpeed's (data, tensor) process groups for AutoTP; returns the module to pass as `mpu`."""
    groups._init_tp_mesh_device(tensor_model_parallel_size=tp)
    return groups


def prepare_tensor_parallel(model: GPT, tp: int):
    """Process groups for `tp`-way tensor parallelism and per-rank dropout in the split attention; returns the
    `mpu` for `deepspeed.initialize`, which splits the linears by the plan of megapile/parallel/tensor.py."""
    mpu = init_groups(tp)
    for module in model.modules():
        if isinstance(module, Attention):  # the one dropout inside the sharded region: each rank its own heads
            module.dropout_stream = mpu.get_tensor_model_parallel_rank()
    return mpu
