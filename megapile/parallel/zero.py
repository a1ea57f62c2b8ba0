"""ZeRO data parallelism: turn a plain model into a DeepSpeed engine.

The megapile YAML is the single source of truth for batch sizes, clipping and precision. The
DeepSpeed JSON carries the ZeRO/offload settings; any key it shares with the YAML must agree, so
the two can never disagree silently.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any

import torch

from megapile.config import Config, ConfigError, grad_accum_steps
from megapile.optim import build_optimizer, build_scheduler
from megapile.parallel.plain_step import guard_plain_step, needs_guard, without_clipping


def load_ds_json(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        raise ConfigError(f"{path}: DeepSpeed config file not found")
    try:
        with open(path) as f:
            ds = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{path}: top level must be a JSON object")
    return ds


def resolve_dtype(cfg: Config, device: torch.device) -> str:
    if cfg.train.dtype != "auto":
        return cfg.train.dtype
    return "bf16" if device.type == "cuda" else "fp32"


def resolve_ds_config(ds: dict[str, Any], cfg: Config, dp_size: int, dtype: str, source: str) -> dict[str, Any]:
    """Fill the engine config from the YAML; refuse keys that contradict it."""
    out = {k: copy.deepcopy(v) for k, v in ds.items() if not k.startswith("_")}  # "_comment" etc.
    for key in ("optimizer", "scheduler"):
        if key in out:
            raise ConfigError(f"{source}: remove '{key}': megapile builds it from the optim section of the YAML")
    accum = grad_accum_steps(cfg.train, dp_size)
    wanted = {
        "train_batch_size": (cfg.train.global_batch_size, "train.global_batch_size"),
        "train_micro_batch_size_per_gpu": (cfg.train.micro_batch_size, "train.micro_batch_size"),
        "gradient_accumulation_steps": (accum, "global / (micro × data-parallel size)"),
        "gradient_clipping": (cfg.optim.grad_clip, "optim.grad_clip"),
    }
    for key, (value, origin) in wanted.items():
        if key in out and out[key] != value:
            raise ConfigError(f"{source}: {key} is {out[key]} but the megapile config gives {value} ({origin})")
        out[key] = value
    for name in ("bf16", "fp16"):
        enabled = bool(out.get(name, {}).get("enabled", False))
        if name in out and enabled != (dtype == name):
            raise ConfigError(f"{source}: {name}.enabled is {enabled} but train.dtype resolves to {dtype}")
        out.setdefault(name, {})["enabled"] = dtype == name
    stage = out.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{source}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage}")
    if cfg.parallel.pipeline > 1 and stage == 0 and dtype == "bf16":  # train.dtype auto is bf16 on GPUs
        raise ConfigError(f"{source}: parallel.pipeline > 1 in bf16 needs zero_optimization.stage 1 "
                          "(ds_configs/zero1.json): DeepSpeed's ZeRO-0 pipeline cannot load its own bf16 checkpoints "
                          "(it saves the bf16 optimizer's state as one dict and loads it as a per-rank list)")
    if dtype != "fp32":
        accum_dtype = resolve_grad_accum_dtype(cfg.train.grad_accum_dtype, dtype, stage)
        given = out.get("data_types", {}).get("grad_accum_dtype")
        if given is not None and given != accum_dtype:
            raise ConfigError(f"{source}: data_types.grad_accum_dtype is {given!r} but the megapile config gives "
                              f"{accum_dtype!r} (train.grad_accum_dtype)")
        out.setdefault("data_types", {})["grad_accum_dtype"] = accum_dtype
    out.setdefault("steps_per_print", 10**9)  # megapile logs; keep DeepSpeed's own step prints quiet
    return out


def resolve_grad_accum_dtype(asked: str, dtype: str, stage: int) -> str:
    """What bf16/fp16 gradients are summed in over micro-batches: fp32 unless asked otherwise, where DeepSpeed
    can (ZeRO >= 1: its ZeRO optimizers and, for bf16 ZeRO-1, BF16_Optimizer keep fp32 gradient buffers);
    its ZeRO-0 engine (with or without the pipeline) has only the training dtype."""
    if asked not in ("auto", "fp32", dtype):
        raise ConfigError(f"train.grad_accum_dtype must be auto, fp32 or the training dtype ({dtype}); got {asked!r}")
    if asked == "auto":
        return "fp32" if stage >= 1 else dtype
    if asked == "fp32" and stage == 0:
        raise ConfigError(f"train.grad_accum_dtype fp32 with train.dtype {dtype} needs zero_optimization.stage >= 1 "
                          f"(DeepSpeed's ZeRO-0 sums {dtype} gradients in {dtype}): use ds_configs/zero1.json, or "
                          f"train.grad_accum_dtype: {dtype}")
    return asked


def optimizer_offloaded(ds_config: dict[str, Any]) -> bool:
    device = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device in ("cpu", "nvme")


def wrap_zero(model: torch.nn.Module, groups: list[dict], cfg: Config, ds_config: dict[str, Any]):
    """Return (engine, optimizer, scheduler) with our AdamW and warmup+decay schedule inside DeepSpeed."""
    import deepspeed

    optimizer = build_optimizer(groups, cfg.optim, cpu_offload=optimizer_offloaded(ds_config))
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    guarded = needs_guard(ds_config)  # ZeRO-0 in fp32: megapile's norm, clipping and non-finite skip
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=without_clipping(ds_config) if guarded else ds_config,
    )
    if guarded:
        guard_plain_step(optimizer, cfg.optim.grad_clip, engine.device)
    return engine, optimizer, scheduler


def after_skipped_step(engine) -> None:
    """Put ZeRO-3 back the way a completed step leaves it. On a non-finite gradient DeepSpeed's stage-3 step
    partitions every parameter and returns early, before re-gathering its persistent ones (the small
    parameters it keeps whole on every rank); the next step's recorded fetch order then no longer matches
    and DeepSpeed aborts ("tracing error") whenever that order was recorded with them whole, e.g. after a resume."""
    optimizer = engine.optimizer
    if engine.zero_optimization_stage() == 3 and getattr(optimizer, "persistent_parameters", None):
        optimizer.persistent_parameters[0].all_gather(optimizer.persistent_parameters)
