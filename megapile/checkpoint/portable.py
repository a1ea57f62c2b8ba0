"""Full weights from a checkpoint of any layout (consolidate, export, eval, generate), and the full fp32 state of
checkpoints written before checkpoints carried slices.

A checkpoint with slices (megapile/checkpoint/fragments.py) gives each parameter whole by name. An older one
holds DeepSpeed's shards, which DeepSpeed loads only into the layout that wrote them; megapile reads them into the
one form every layout shares, the full fp32 value of each named parameter and its two Adam moments (`FullState`,
which `slices.load` puts into any ZeRO layout):

- DeepSpeed's own `zero_to_fp32` merge functions reassemble the flat per-rank partitions. They are written for
  the fp32 master weights; the Adam moments are partitioned exactly the same way, so the same functions
  reassemble them too. A ZeRO-0 checkpoint holds a plain torch optimizer state dict.
- Tensor- and pipeline-parallel ones give full weights through megapile/checkpoint/shards.py.

Each function that touches DeepSpeed's shards imports deepspeed itself (lazy): it adds ~0.5 s to torch's import
and logs "Setting accelerator to CPU" without a GPU, and eval, generate and export-hf import this module for
Hugging Face directories too, which never touch a shard.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from megapile.checkpoint import fragments, state_file

MOMENTS = ("exp_avg", "exp_avg_sq")


def read_full_weights(path: str, zero_stage: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The value of every parameter (its fp32 master, in `dtype`), from a checkpoint of any layout."""
    if fragments.present(path):  # its slices, by parameter name; one parameter in fp32 at a time
        stored = fragments.Stored(path)
        return {name: stored.full(name).to(dtype) for name in stored.params}
    from deepspeed.utils import zero_to_fp32 as z  # lazy: see the module docstring

    state = state_file.read(path)
    if state.tensor > 1 or state.pipeline > 1:
        # lazy: checkpoint.shards imports deepspeed at the top (megapile.parallel.pipeline too); see the docstring
        from megapile.checkpoint.shards import read_parallel_weights

        return read_parallel_weights(path, state)  # tensor/pipeline slices joined into GPT names
    if zero_stage == 0:
        model_state = torch.load(z.get_model_state_file(path, 0), map_location="cpu", weights_only=False)
        weights = {n: t.float() for n, t in model_state["module"].items()}
        order = state.param_order  # []: saved before it was recorded, when bf16/fp16 ZeRO-0 was not read
        if order and {"fp32_groups", "fp32_groups_flat"} & set(model_state.get("optimizer") or {}):  # bf16/fp16
            weights.update(_read_stage0(model_state, order)["fp32"])
        return weights
    return _read_zero(path, zero_stage, moments=())["fp32"]


def read_full_state(path: str, zero_stage: int, param_order: list[str]) -> dict[str, Any]:
    """{"fp32": {name: tensor}, "exp_avg": {...}, "exp_avg_sq": {...}, "step": int, "lr_scheduler": dict}.

    `param_order` names the parameters in the order the optimizer numbers them (its groups, in order),
    which is how a ZeRO-0 checkpoint's plain torch optimizer state refers to them.
    """
    from deepspeed.utils.zero_to_fp32 import get_model_state_file  # lazy: see the module docstring

    model_file = get_model_state_file(path, zero_stage)  # ZeRO-3 names it per rank; rank 0 holds the schedule
    # DeepSpeed's own files hold pickled Python objects; they are only ever loaded from our checkpoint dir.
    model_state = torch.load(model_file, map_location="cpu", weights_only=False)
    if zero_stage == 0:
        full = _read_stage0(model_state, param_order)
    else:
        full = _read_zero(path, zero_stage)
    full["lr_scheduler"] = model_state.get("lr_scheduler")
    return full


def _read_stage0(model_state: dict, param_order: list[str]) -> dict[str, Any]:
    """A ZeRO-0 checkpoint. fp32: a plain torch optimizer, one state entry per parameter. bf16/fp16: DeepSpeed's
    FP16 optimizers keep fp32 masters, which are the weights to read (the module holds their bf16 copies):
    the unfused one a master per parameter (`fp32_groups`), the fused one a flat master per parameter group
    (`fp32_groups_flat`, its moments flat alike), cut back into parameters in the optimizer's order."""
    optim = model_state.get("optimizer") or {}
    module = model_state["module"]
    if "fp32_groups_flat" in optim:
        flats = optim["fp32_groups_flat"]
        inner = optim.get("optimizer_state_dict", {}).get("state", {})
        cut = lambda tensors: _unflatten(tensors, param_order, module)  # noqa: E731
        full = {"fp32": cut(flats)}
        for key in MOMENTS:
            full[key] = cut([inner[i][key] for i in range(len(flats))]) if inner else {}
        state = inner
    else:  # one state entry per parameter; the unfused FP16_Optimizer (bf16 on CPU) also one fp32 master each
        unfused = "fp32_groups" in optim
        state = (optim.get("optimizer_state_dict", {}) if unfused else optim).get("state", {})
        masters = (zip(param_order, (t for group in optim["fp32_groups"] for t in group)) if unfused
                   else ((n, t) for n, t in module.items() if n in set(param_order)))
        full = {"fp32": {n: t.float().clone() for n, t in masters}}
        for key in MOMENTS:
            full[key] = {param_order[i]: s[key].float() for i, s in state.items() if key in s}
    full["step"] = int(max((float(s["step"]) for s in state.values() if "step" in s), default=0))
    return full


def _unflatten(flats: list[torch.Tensor], param_order: list[str], module: dict) -> dict[str, torch.Tensor]:
    """Split per-group flat tensors into the parameters they concatenate, walking `param_order` group by group."""
    out, names = {}, iter(param_order)
    for flat in flats:
        offset = 0
        while offset < flat.numel():
            name = next(names)
            shape = module[name].shape
            n = module[name].numel()
            out[name] = flat[offset:offset + n].view(shape).float().clone()
            offset += n
    return out


def _read_zero(path: str, zero_stage: int, moments: tuple[str, ...] = MOMENTS) -> dict[str, Any]:
    """ZeRO-1/2/3 shards, and bf16 ZeRO-1's BF16_Optimizer shards (partitioned like ZeRO-1, but without the
    `zero_stage` entry that DeepSpeed's own `zero_to_fp32` entry points insist on)."""
    from deepspeed.utils import zero_to_fp32 as z  # lazy: see the module docstring

    zero_model_states = z.parse_model_states(z.get_model_state_files(path))
    optim_files = z.get_optim_files(path)
    shards = [torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"] for f in optim_files]
    world_size = len(shards)
    flat_key = "single_partition_of_fp32_groups" if zero_stage <= 2 else "fp32_flat_groups"

    def merge(flat_groups: list[list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        if zero_stage <= 2:
            merged = z._get_fp32_state_dict_from_zero2_checkpoint(
                world_size, flat_groups, zero_model_states, False, shards[0].get("param_alignment_paddings"))
        else:
            merged = z._get_fp32_state_dict_from_zero3_checkpoint(world_size, flat_groups, zero_model_states, False)
        return {n: t.float() for n, t in z.to_torch_tensor(merged).items()}  # ZeRO-3 merges lazily

    full = {"fp32": merge([s[flat_key] for s in shards])}
    for key in moments:
        full[key] = merge([_moment_groups(s, key, zero_stage) for s in shards])
    step_values = [float(st["step"]) for st in _base_states(shards[0], zero_stage) if "step" in st]
    full["step"] = int(max(step_values, default=0))
    return full


def _base_states(shard: dict, zero_stage: int) -> list[dict]:
    base = shard["optimizer_state_dict"] if zero_stage == 3 else shard["base_optimizer_state"]
    if isinstance(base, dict) and "state" in base:
        return [base["state"][k] for k in sorted(base["state"])]
    return list(base)


def _moment_groups(shard: dict, key: str, zero_stage: int) -> list[torch.Tensor]:
    return [st[key] for st in _base_states(shard, zero_stage)]


class FullState:
    """An older checkpoint's full tensors (`read_full_state`), as a source for `slices.load`: checkpoints written
    before the portable slices existed reshard through it."""

    def __init__(self, full: dict[str, Any]):
        self.full = full
        self.step = full["step"]
        self.lr_scheduler = full.get("lr_scheduler")

    def has(self, name: str, kind: str) -> bool:
        return name in self.full.get(kind, {})

    def read(self, name: str, kind: str, split_dim: Optional[int], tp_rank: int, tensor: int, start: int,
             end: int, shape: Optional[tuple[int, ...]] = None) -> torch.Tensor:
        value = self.full[kind][name]
        if shape is not None and tuple(shape) != tuple(value.shape):  # another vocabulary padding
            return fragments.read_padded_rows(name, list(value.shape), shape, split_dim, start, end,
                                              lambda lo, hi: value.reshape(-1)[lo:hi].float())
        if split_dim is not None:
            value = value.chunk(tensor, dim=split_dim)[tp_rank]
        return value.reshape(-1)[start:end].float()
