"""The DeepSpeed config, generated from the megapile run config.

The YAML is the single source of truth: batch sizes, clipping and precision (`train`, `optim`) and ZeRO's
settings (`parallel.zero_stage`, offload, overlap, bucket sizes). A `--deepspeed_config` JSON still works:

- a ZeRO key the JSON sets and the YAML leaves unset is taken from the JSON (`apply_ds_json`), so the
  resolved run config says what ran;
- a key both set to different values is a one-line error naming both;
- keys megapile does not model (e.g. `wall_clock_breakdown`, `stage3_param_persistence_threshold`) pass
  through to DeepSpeed unchanged; `optimizer` and `scheduler` are refused (megapile builds them).
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any

import torch

from megapile.config import Config, ConfigError, ParallelConfig, grad_accum_steps
from megapile.parallel.layout import Layout, precision_refusal, resolve_layout
from megapile.parallel.tensor import autotp_section

# parallel.<key> -> (where DeepSpeed reads it under zero_optimization, the value when neither file sets it;
# None: leave it to DeepSpeed's own default)
ZERO_KEYS = {
    "zero_stage": (("stage",), 0),
    "offload_optimizer": (("offload_optimizer", "device"), "none"),
    "offload_params": (("offload_param", "device"), "none"),
    "overlap_comm": (("overlap_comm",), None),
    "reduce_bucket_size": (("reduce_bucket_size",), None),
    "allgather_bucket_size": (("allgather_bucket_size",), None),
}


def resolve_parallel(cfg: Config, ds_json_path: str | None, world_size: int,
                     device: torch.device) -> tuple[Layout, dict[str, Any], str]:
    """What a run config gives on `world_size` ranks of `device`s: (layout, DeepSpeed config, training dtype).
    Fills `cfg.parallel`'s unset ZeRO keys, so the resolved config says what runs; one-line errors otherwise."""
    ds_json = load_ds_json(ds_json_path)
    source = ds_json_path or "the DeepSpeed config generated from the run config"
    apply_ds_json(cfg.parallel, ds_json, source)
    if cfg.parallel.overlap_comm is None and cfg.parallel.zero_stage >= 1:
        # Overlap the gradient reduction with the backward pass on GPUs (separate CUDA streams); on CPU gloo has
        # nothing to overlap with, and off is deterministic. DeepSpeed's own default differs by stage.
        cfg.parallel.overlap_comm = device.type == "cuda"
    layout = resolve_layout(cfg, world_size)
    dtype = resolve_dtype(cfg, device)
    return layout, resolve_ds_config(ds_json, cfg, layout.data, dtype, source), dtype


def load_ds_json(path: str | None) -> dict[str, Any]:
    """The user's DeepSpeed JSON, or {} when none is given (everything then comes from the YAML)."""
    if path is None:
        return {}
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


def apply_ds_json(par: ParallelConfig, ds: dict[str, Any], source: str) -> None:
    """Fill the ZeRO keys of `par` the YAML left unset from the JSON, or with megapile's defaults; a key both
    set to different values is an error."""
    zero = ds.get("zero_optimization", {})
    for key, (path, default) in ZERO_KEYS.items():
        given = _lookup(zero, path)
        mine = getattr(par, key)
        _check_agree(source, key, given, mine)
        if mine is None:
            setattr(par, key, given if given is not None else default)
    if par.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"{source}: zero_optimization.stage must be 0, 1, 2 or 3, got {par.zero_stage}")
    if par.offload_optimizer != "none" and par.zero_stage == 0:
        raise ConfigError(f"parallel.offload_optimizer {par.offload_optimizer} needs parallel.zero_stage 1, 2 or 3")
    if par.offload_params != "none" and par.zero_stage != 3:
        raise ConfigError(f"parallel.offload_params {par.offload_params} needs parallel.zero_stage 3")


def resolve_dtype(cfg: Config, device: torch.device) -> str:
    """train.dtype, with auto: fp32 on CPU; on a GPU bf16 where it computes in bf16 (compute capability >= 8.0,
    e.g. A100, H100), else fp16, which DeepSpeed trains with dynamic loss scaling."""
    if cfg.train.dtype != "auto":
        return cfg.train.dtype
    if device.type != "cuda":
        return "fp32"
    if not torch.cuda.is_available():  # `megapile config show --device cuda` on a machine without a GPU
        return "bf16"
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"


def resolve_ds_config(ds: dict[str, Any], cfg: Config, dp_size: int, dtype: str, source: str) -> dict[str, Any]:
    """The engine config: the JSON (if any) with everything the YAML decides filled in; keys that contradict the
    YAML are refused."""
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
    _fill_zero(out, cfg.parallel, source)
    _fill_precision(out, cfg, dtype, source)
    if cfg.parallel.tensor > 1 and cfg.parallel.pipeline == 1:  # pipeline stages split their own blocks
        out["tensor_parallel"] = autotp_section(cfg.parallel.tensor, cfg.model.family.tensor_plan)
    out.setdefault("steps_per_print", 10**9)  # megapile logs; keep DeepSpeed's own step prints quiet
    return out


def _fill_zero(out: dict[str, Any], par: ParallelConfig, source: str) -> None:
    """Write the YAML's ZeRO settings into `zero_optimization` (after `apply_ds_json` they agree with the JSON's)."""
    zero = out.setdefault("zero_optimization", {})
    for key, (path, _) in ZERO_KEYS.items():
        mine, given = getattr(par, key), _lookup(zero, path)
        if mine is None or (path[-1] == "device" and mine == "none" and given is None):
            continue  # unset: DeepSpeed's default (or the JSON's value); no offload: no section
        _check_agree(source, key, given, mine)
        node = zero
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = mine
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{source}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage}")


def _fill_precision(out: dict[str, Any], cfg: Config, dtype: str, source: str) -> None:
    for name in ("bf16", "fp16"):
        enabled = bool(out.get(name, {}).get("enabled", False))
        if name in out and enabled != (dtype == name):
            raise ConfigError(f"{source}: {name}.enabled is {enabled} but train.dtype resolves to {dtype}")
        out.setdefault(name, {})["enabled"] = dtype == name
    stage = out["zero_optimization"].get("stage", 0)
    reason = precision_refusal(cfg.parallel.pipeline, stage, dtype)
    if reason is not None:
        raise ConfigError(f"{source}: {reason}")
    if dtype == "fp32":
        return
    accum_dtype = resolve_grad_accum_dtype(cfg.train.grad_accum_dtype, dtype, stage)
    given = out.get("data_types", {}).get("grad_accum_dtype")
    if given is not None and given != accum_dtype:
        raise ConfigError(f"{source}: data_types.grad_accum_dtype is {given!r} but the megapile config gives "
                          f"{accum_dtype!r} (train.grad_accum_dtype)")
    out.setdefault("data_types", {})["grad_accum_dtype"] = accum_dtype


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


def precision_line(ds_config: dict, dtype: str) -> str:
    """The start-up line's precision: the training dtype and, under bf16/fp16, what gradients are summed in."""
    accum_dtype = ds_config.get("data_types", {}).get("grad_accum_dtype", dtype)
    if dtype == "fp32":
        return dtype
    why = ""
    if accum_dtype != "fp32" and ds_config.get("zero_optimization", {}).get("stage", 0) == 0:
        why = ": DeepSpeed's ZeRO-0 has no fp32 accumulation, ZeRO-1 has"
    return f"{dtype} (gradients summed in {accum_dtype}{why})"


def _check_agree(source: str, key: str, given: Any, mine: Any) -> None:
    """A ZeRO key set in both the JSON (`given`) and the YAML (`mine`, parallel.<key>) must have one value."""
    if given is not None and mine is not None and given != mine:
        path = ".".join(ZERO_KEYS[key][0])
        raise ConfigError(f"{source}: zero_optimization.{path} is {given!r} but the megapile config gives {mine!r} "
                          f"(parallel.{key}): set it in one place")


def _lookup(node: dict, path: tuple[str, ...]) -> Any:
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node
