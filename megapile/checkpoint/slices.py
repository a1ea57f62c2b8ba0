"""Which slice of each parameter's fp32 master weight and Adam moments this rank's optimizer holds, in every engine
megapile builds, read and written through DeepSpeed's tensor-fragment API.

A parameter is named as in the plain model (`model.GPT`). Tensor parallelism cuts it along `split_dim` into
`tensor` equal parts (megapile/parallel/tensor.py); part `tp_rank`, flattened, is this rank's *local* tensor
(the whole parameter without tensor parallelism). This rank's optimizer holds the flat range [start, end) of it:

    ZeRO-1/2, bf16's optimizer   the tensor fragment DeepSpeed maps onto this rank's flat partition
                                 (`param._hp_mapping`: its `lp_fragment_address` and `get_hp_fragment`)
    ZeRO-3                       partition r of the data-parallel group: [r·P, r·P + P), P = `partition_numel()`,
                                 the last one padded (`safe_get/set_local_fp32_param`, `..._optimizer_state`)
    ZeRO-0                       all of it: every data-parallel rank holds a replica, in the torch optimizer's
                                 state (fp32) or in DeepSpeed's fp32 masters of the bf16/fp16 module

The module's own (possibly bf16) copy of the weights is set from the same fp32 values: DeepSpeed makes it by
rounding the masters after every step, so a loaded copy equals the one the saving run had.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import deepspeed
import torch
import torch.distributed as dist

from megapile.checkpoint.fragments import KINDS
from megapile.models import TensorPlan
from megapile.parallel.layout import Layout
from megapile.parallel.pipeline import gpt_name
from megapile.reporting.progress import bar

MOMENTS = KINDS[1:]


@dataclass
class Held:
    """One parameter as this rank's module holds it."""

    name: str  # the plain model's name
    param: torch.nn.Parameter
    shape: tuple[int, ...]  # global shape
    split_dim: Optional[int]  # None: whole on every tensor rank
    tp_rank: int  # 0 and 1 when whole
    tensor: int
    owner: bool  # this rank saves it: whole parameters from tensor rank 0, tied ones from the first stage

    @property
    def local_shape(self) -> tuple[int, ...]:
        shape = list(self.shape)
        if self.split_dim is not None:
            shape[self.split_dim] //= self.tensor
        return tuple(shape)

    @property
    def numel(self) -> int:
        return int(torch.Size(self.local_shape).numel())


def held(engine, layout: Layout, rank: int, num_layers: int, plan: TensorPlan) -> list[Held]:
    """Every parameter of this rank's module, under its plain-model name, split as the family's `plan` says."""
    out = []
    for module_name, p in engine.module.named_parameters():
        name = gpt_name(module_name, num_layers) if layout.pipeline > 1 else module_name
        if name is None:
            raise ValueError(f"parameter {module_name} has no plain-model name")
        local = tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3 keeps only a partition in p.data
        dim = plan.split_dim(name) if layout.tensor > 1 else None
        tp_rank, tensor = (layout.tensor_rank(rank), layout.tensor) if dim is not None else (0, 1)
        shape = tuple(n * tensor if d == dim else n for d, n in enumerate(local))
        owner = (dim is not None or layout.tensor_rank(rank) == 0) and \
            (not module_name.startswith("tied_modules.") or layout.stage(rank) == 0)
        out.append(Held(name, p, shape, dim, tp_rank, tensor, owner))
    return out


def holder(engine) -> "_Fragments | _Zero3 | _Replica":
    """The accessor for this engine's optimizer (see the module docstring)."""
    if engine.zero_optimization_stage() == 3:
        return _Zero3(engine)
    if any(getattr(p, "_hp_mapping", None) is not None for p in engine.module.parameters()):
        return _Fragments(engine)
    return _Replica(engine)


class _Fragments:
    """ZeRO-1/2 and bf16's optimizer: DeepSpeed's tensor fragments (a rank may hold none of a parameter)."""

    replicated = False

    def __init__(self, engine):
        self.engine = engine
        self._link()

    def _link(self) -> None:
        """Point every fragment at its slice of Adam's state. DeepSpeed 0.19's ZeRO-1/2 links them once, right after
        the first parameter group's first step, when the other groups have no state yet; their fragments then
        have no moments (and its own `safe_get_full_optimizer_state` fails on them). Linking again is harmless."""
        optimizer = self.engine.optimizer
        if hasattr(optimizer, "_hp_optimizer_states_linked") and optimizer.optimizer.state:
            optimizer._hp_optimizer_states_linked = False
            optimizer._lazy_init_hp_params_optimizer_state()

    def span(self, h: Held) -> Optional[tuple[int, int]]:
        mapping = h.param._hp_mapping
        if mapping is None:
            return None
        address = mapping.lp_fragment_address
        return address.start, address.start + address.numel

    def get(self, h: Held, kind: str) -> Optional[torch.Tensor]:
        mapping = h.param._hp_mapping
        if kind != "fp32" and not mapping.optim_fragment:  # no step yet: Adam has no moments
            return None
        return mapping.get_hp_fragment(None if kind == "fp32" else kind)

    def put(self, h: Held, kind: str, values: torch.Tensor) -> None:
        self.get(h, kind).data.copy_(values)

    def module_span(self, h: Held) -> tuple[int, int]:
        """The module's copy: the whole local tensor, on every data-parallel rank."""
        return 0, h.numel

    def put_module(self, h: Held, values: torch.Tensor) -> None:
        with torch.no_grad():
            h.param.data.copy_(values.view(h.param.shape))

    def prepare(self) -> None:
        """Adam's state exists only after the first step; the moments need somewhere to go before it."""
        base = self.engine.optimizer.optimizer
        _ensure_adam_state(base, [p for g in base.param_groups for p in g["params"]])
        self._link()

    def finish(self) -> None:
        pass

    def states(self) -> list[dict]:
        return list(self.engine.optimizer.optimizer.state.values())


class _Zero3:
    """ZeRO-3: each parameter partitioned evenly over the data-parallel group, the last partition padded."""

    replicated = False

    def __init__(self, engine):
        self.engine = engine

    @staticmethod
    def _partition(h: Held) -> tuple[int, int]:
        size = h.param.partition_numel()
        return dist.get_rank(group=h.param.ds_process_group) * size, size

    def span(self, h: Held) -> Optional[tuple[int, int]]:
        start, size = self._partition(h)
        end = min(start + size, h.numel)
        return (start, end) if end > start else None

    def get(self, h: Held, kind: str) -> Optional[torch.Tensor]:
        start, end = self.span(h)
        if kind == "fp32":
            return deepspeed.utils.safe_get_local_fp32_param(h.param)[:end - start]
        state = self.engine.optimizer.optimizer.state
        if not any(kind in s for s in state.values()):
            return None
        return deepspeed.utils.safe_get_local_optimizer_state(h.param, kind)[:end - start]

    def _padded(self, h: Held, values: torch.Tensor) -> torch.Tensor:
        _, size = self._partition(h)
        out = torch.zeros(size, dtype=torch.float32, device=values.device)
        out[:values.numel()] = values
        return out

    def put(self, h: Held, kind: str, values: torch.Tensor) -> None:
        if kind == "fp32":
            deepspeed.utils.safe_set_local_fp32_param(h.param, self._padded(h, values))
        else:
            deepspeed.utils.safe_set_local_optimizer_state(h.param, self._padded(h, values), kind)

    def module_span(self, h: Held) -> tuple[int, int]:
        """The module's copy is this rank's partition too (`ds_tensor`); one of padding only reads nothing."""
        return self.span(h) or (0, 0)

    def put_module(self, h: Held, values: torch.Tensor) -> None:
        with torch.no_grad():
            h.param.ds_tensor.data.copy_(self._padded(h, values).to(h.param.ds_tensor.device))

    def prepare(self) -> None:
        """Release every gathered parameter first, as DeepSpeed's own load does: a persistent one (at most
        stage3_param_persistence_threshold elements: norms, biases) stays whole in `p.data` between steps, and a
        rollback into a running engine would otherwise train on the abandoned branch's copy."""
        self.engine.optimizer.checkpoint_event_prologue()
        _ensure_adam_state(self.engine.optimizer.optimizer, self.engine.optimizer.fp32_partitioned_groups_flat)

    def finish(self) -> None:
        """Gather the persistent parameters again, now from the loaded partitions."""
        self.engine.optimizer.checkpoint_event_epilogue()

    def states(self) -> list[dict]:
        return list(self.engine.optimizer.optimizer.state.values())


class _Replica:
    """ZeRO-0: every rank holds everything. The fp32 run's torch optimizer keeps its state per parameter; a
    bf16/fp16 module's DeepSpeed optimizer keeps fp32 masters, one per parameter (unfused) or one flat per
    parameter group (fused), with Adam's state keyed by the master."""

    replicated = True

    def __init__(self, engine):
        optimizer = engine.optimizer
        self.inner = optimizer.optimizer if hasattr(optimizer, "fp16_groups") else optimizer
        self.where: dict[int, tuple[torch.Tensor, int]] = {}  # id(param): (state key tensor, offset in it)
        if not hasattr(optimizer, "fp16_groups"):
            for g in optimizer.param_groups:
                for p in g["params"]:
                    self.where[id(p)] = (p, 0)
        elif hasattr(optimizer, "fp32_groups_flat"):
            for flat, group in zip(optimizer.fp32_groups_flat, optimizer.fp16_groups):
                offset = 0
                for p in group:
                    self.where[id(p)] = (flat, offset)
                    offset += p.numel()
        else:
            for masters, group in zip(optimizer.fp32_groups, optimizer.fp16_groups):
                for master, p in zip(masters, group):
                    self.where[id(p)] = (master, 0)

    def span(self, h: Held) -> Optional[tuple[int, int]]:
        return 0, h.numel

    def get(self, h: Held, kind: str) -> Optional[torch.Tensor]:
        target, offset = self.where[id(h.param)]
        if kind == "fp32":
            tensor = target
        elif kind in self.inner.state.get(target, {}):
            tensor = self.inner.state[target][kind]
        else:
            return None
        return tensor.detach().view(-1)[offset:offset + h.numel]

    def put(self, h: Held, kind: str, values: torch.Tensor) -> None:
        with torch.no_grad():
            self.get(h, kind).copy_(values)

    def module_span(self, h: Held) -> tuple[int, int]:
        return 0, h.numel

    def put_module(self, h: Held, values: torch.Tensor) -> None:
        target, _ = self.where[id(h.param)]
        if target is not h.param:  # fp32: the parameter is its own master, set with it
            with torch.no_grad():
                h.param.data.copy_(values.view(h.param.shape))

    def prepare(self) -> None:
        _ensure_adam_state(self.inner, list({id(t): t for t, _ in self.where.values()}.values()))

    def finish(self) -> None:
        pass

    def states(self) -> list[dict]:
        return list(self.inner.state.values())


def optimizer_step(accessor) -> int:
    """Adam's step count (the same in every state entry)."""
    return int(max((float(s["step"]) for s in accessor.states() if "step" in s), default=0))


def set_optimizer_step(accessor, step: int) -> None:
    for state in accessor.states():
        if "step" in state:
            state["step"] = torch.full_like(state["step"], step) if torch.is_tensor(state["step"]) else step


def _ensure_adam_state(optimizer: torch.optim.Optimizer, tensors: list[torch.Tensor]) -> None:
    """ZeRO and CPU Adam create Adam's state at the first step; the moments need somewhere to go before it."""
    int_step = type(optimizer).__name__ == "DeepSpeedCPUAdam"  # its C++ kernel takes a Python int
    for p in tensors:
        state = optimizer.state[p]
        state.setdefault("step", 0 if int_step else torch.tensor(0.0))
        for key in MOMENTS:
            state.setdefault(key, torch.zeros_like(p))


def load(engine, source, layout: Layout, rank: int, num_layers: int, plan: TensorPlan,
         show_progress: bool = False) -> None:
    """Fill a freshly built engine of any layout from `source` (`fragments.Stored`, or full tensors of an older
    checkpoint): each parameter's fp32 master and Adam moments in the slice this rank's optimizer holds, the
    module's copy, Adam's step and the LR schedule. Reads one parameter at a time."""
    params = held(engine, layout, rank, num_layers, plan)
    missing = sorted(h.name for h in params if not source.has(h.name, "fp32"))
    if missing:
        raise ValueError(f"the checkpoint has no value for {', '.join(missing[:5])}")
    accessor = holder(engine)
    accessor.prepare()
    for h in bar(params, desc="load slices", unit="tensor", enabled=show_progress):
        # the module's range holds the optimizer's (the whole local tensor, or the same partition): read once
        module_start, module_end = accessor.module_span(h)
        weights = source.read(h.name, "fp32", h.split_dim, h.tp_rank, h.tensor, module_start, module_end,
                              shape=h.shape)  # the vocabulary's rows padded as this run pads them
        accessor.put_module(h, weights)
        span = accessor.span(h)
        if span is None:
            continue
        for kind in KINDS:
            if kind == "fp32":
                values = weights[span[0] - module_start:span[1] - module_start]
            elif source.has(h.name, kind):
                values = source.read(h.name, kind, h.split_dim, h.tp_rank, h.tensor, *span, shape=h.shape)
            else:
                continue
            accessor.put(h, kind, values)  # copy_ moves it to the optimizer's device
    accessor.finish()
    set_optimizer_step(accessor, source.step)
    scheduler = engine.lr_scheduler
    if scheduler is not None and source.lr_scheduler:
        scheduler.load_state_dict(source.lr_scheduler)  # its step; the lr is the caller's (optim.follow_config)
