"""The layout-free part of a checkpoint: every rank writes the slices of the fp32 master weights and Adam moments
it holds, each described by global parameter name and where it sits; a run of any layout reads only the slices
its own ranks need.

    global_stepN/portable/rank00003-0.safetensors   this rank's slices, 1-D fp32, one tensor per slice, in files
                                                    of at most FILE_BYTES (bounds the host copy of a GPU shard)
    global_stepN/portable/index.json                every slice (parameter, kind, tensor-parallel part, flat range,
                                                    file, key), every parameter's global shape and split, Adam's
                                                    step and the LR schedule; written by rank 0 from all ranks'

A slice is the flat range [start, end) of a *local* tensor: part `tp_rank` of `tensor` of the parameter cut along
its tensor-parallel `split_dim` (megapile/checkpoint/slices.py). ZeRO-1/2/3 ranks write the fragments their
optimizer holds; ZeRO-0's replicas split each tensor between them, so every rank writes about the same amount.
A reader on the same tensor-parallel cut copies the overlapping ranges; on another cut it assembles one
parameter at a time and cuts it anew, so a rank never holds more than its shard plus one parameter.

The vocabulary's rows (`VOCAB_PARAMS`) are stored as the saving run padded them. A run that pads them
differently (another model.pad_vocab_multiple, or another parallel.tensor: megapile/parallel/layout.py) reads
the rows both have and zeros for the rest: the real rows always, padding rows cropped or added. Padding rows are
never scored (`GPT.loss`, sampling) and have no gradient, so zeros stay zeros and the losses are unchanged;
a same-padding resume reads every row as saved (padding rows decay from their initial values: not derivable).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megapile.parallel.layout import Layout

KINDS = ("fp32", "exp_avg", "exp_avg_sq")  # the fp32 master weight and Adam's two moments
DIR = "portable"
INDEX = "index.json"
FILE_BYTES = 1 << 30
VOCAB_PARAMS = ("embed.weight", "head.weight")  # (padded vocabulary, hidden), replicated under tensor parallelism


@dataclass(frozen=True)
class Piece:
    name: str
    kind: str
    tp_rank: int
    start: int
    end: int
    file: str  # relative to the portable folder
    key: str


def write(accessor, params_held: list, layout: Layout, rank: int, directory: str) -> tuple[list[Piece], dict]:
    """Write this rank's slices (`slices.holder` and `slices.held` of its engine) under `directory`/portable/;
    return them and what this rank knows of each parameter ({name: {"shape", "split_dim", "tensor"}})."""
    pieces, params, files = collect(accessor, params_held, layout, rank)
    write_files(directory, files)
    return pieces, params


def collect(accessor, params_held: list, layout: Layout, rank: int, buffers: Optional["Buffers"] = None
            ) -> tuple[list[Piece], dict, list[tuple[str, dict[str, torch.Tensor]]]]:
    """This rank's slices as they will be written: (pieces, params as `write` returns them, [(file name,
    {key: tensor})]). Without `buffers` the tensors are the optimizer's own (on the CPU in fp32, views of its
    storage: written at once, no copy); with them, copies in host memory that training may not touch (an
    asynchronous save's snapshot)."""
    pieces, params, files, batch, size = [], {}, [], {}, 0
    for h, kind, start, values in _own_slices(accessor, params_held, layout, rank):
        params[h.name] = {"shape": list(h.shape), "split_dim": h.split_dim, "tensor": h.tensor}
        key = f"{kind}/{h.name}/{h.tp_rank}/{start}"
        file = f"rank{rank:05d}-{len(files)}.safetensors"
        # safetensors takes non-overlapping views of one storage
        batch[key] = buffers.copy(key, values) if buffers is not None else \
            values.detach().to("cpu", torch.float32).contiguous()
        pieces.append(Piece(h.name, kind, h.tp_rank, start, start + values.numel(), file, key))
        size += values.numel() * 4
        if size >= FILE_BYTES:
            files.append((file, batch))
            batch, size = {}, 0
    if batch:
        files.append((f"rank{rank:05d}-{len(files)}.safetensors", batch))
    if buffers is not None:
        buffers.synchronize()
    return pieces, params, files


def write_files(directory: str, files: list[tuple[str, dict[str, torch.Tensor]]]) -> list[str]:
    """Write `collect`'s files under `directory`/portable/; their paths relative to `directory`."""
    os.makedirs(os.path.join(directory, DIR), exist_ok=True)
    for file, tensors in files:
        save_file(tensors, os.path.join(directory, DIR, file))
    return [f"{DIR}/{file}" for file, _ in files]


class Buffers:
    """Host memory an asynchronous save copies this rank's slices into, kept from one save to the next (12 bytes
    per parameter element held: the fp32 master and two moments). Pinned when the values are on a GPU, so the
    copies run without a host sync each; `synchronize` waits for them once. With `defer_cpu`, copies from CPU
    tensors are only recorded, and made by `fill` (the writer thread, while the next forward and backward run)."""

    def __init__(self, defer_cpu: bool = False) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.defer_cpu = defer_cpu
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (buffer, the optimizer's values) to copy
        self._device_copies = False

    def copy(self, key: str, values: torch.Tensor) -> torch.Tensor:
        values = values.detach().reshape(-1)
        buffer = self.tensors.get(key)
        if buffer is None or buffer.numel() != values.numel():
            buffer = torch.empty(values.numel(), dtype=torch.float32, pin_memory=values.is_cuda)
            self.tensors[key] = buffer
        if self.defer_cpu and not values.is_cuda:
            self._pending.append((buffer, values))
        else:
            buffer.copy_(values, non_blocking=values.is_cuda)
            self._device_copies |= values.is_cuda
        return buffer

    def synchronize(self) -> None:
        if self._device_copies:
            torch.cuda.synchronize()
            self._device_copies = False

    def fill(self) -> None:
        """Make the deferred copies (the values must not change until this returns: the optimizer step waits)."""
        for buffer, values in self._pending:
            buffer.copy_(values)
        self._pending = []

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * 4 for t in self.tensors.values())


def _own_slices(accessor, params: list, layout: Layout, rank: int) -> Iterator[tuple]:
    """(parameter, kind, start, values) for each slice this rank saves."""
    for h in params:
        span = accessor.span(h) if h.owner else None
        own = _own_range(accessor, span, layout, rank)
        if own is None:
            continue
        start, end = own
        for kind in KINDS:
            values = accessor.get(h, kind)
            if values is not None:
                offset = start - span[0]
                yield h, kind, start, values[offset:offset + end - start]


def _own_range(accessor, span: Optional[tuple[int, int]], layout: Layout, rank: int) -> Optional[tuple[int, int]]:
    """The part of a parameter's held range `span` (None: not held or not owned) whose slices this rank writes."""
    if span is None:
        return None
    start, end = span
    if accessor.replicated:  # ZeRO-0: each data-parallel replica writes its share of the range
        share = -(-(end - start) // layout.data)
        d = layout.data_rank(rank)
        start, end = start + d * share, min(end, start + (d + 1) * share)
    return (start, end) if start < end else None


def own_elements(accessor, params: list, layout: Layout, rank: int) -> int:
    """How many elements of each kind this rank writes (an asynchronous save copies 3 × 4 bytes of each)."""
    return sum(end - start for h in params
               if (own := _own_range(accessor, accessor.span(h) if h.owner else None, layout, rank))
               for start, end in [own])


def index_of(gathered: list[tuple[list[Piece], dict]], step: int, scheduler: Optional[dict], layout: dict) -> dict:
    """index.json's contents from every rank's (pieces, params); rank 0 only."""
    params, pieces = {}, {}
    for rank_pieces, rank_params in gathered:
        params.update(rank_params)
        for p in rank_pieces:
            pieces.setdefault(p.name, []).append([p.kind, p.tp_rank, p.start, p.end, p.file, p.key])
    return {"format": 1, "layout": layout, "optimizer_step": step, "lr_scheduler": scheduler,
            "params": params, "pieces": pieces}


def write_index(directory: str, gathered: list[tuple[list[Piece], dict]], step: int, scheduler: Optional[dict],
                layout: dict) -> None:
    with open(os.path.join(directory, DIR, INDEX), "w") as f:
        json.dump(index_of(gathered, step, scheduler, layout), f)


def read_padded_rows(name: str, saved_shape: list[int], shape: tuple[int, ...], split_dim: Optional[int], start: int,
                     end: int, read_saved) -> torch.Tensor:
    """Elements [start, end) of vocabulary parameter `name` flattened in the reader's `shape`, which has other padding
    rows than the checkpoint's `saved_shape`: the rows both have from `read_saved(lo, hi)` (the same flat elements,
    rows being contiguous), zeros in the rows only the reader has."""
    if name not in VOCAB_PARAMS or split_dim is not None or list(shape[1:]) != list(saved_shape[1:]):
        raise ValueError(f"{name}: the checkpoint's shape {tuple(saved_shape)} does not fit this run's {tuple(shape)}")
    both = min(shape[0], saved_shape[0]) * int(torch.Size(shape[1:]).numel())
    out = torch.zeros(end - start, dtype=torch.float32)
    if start < both:
        out[:min(end, both) - start] = read_saved(start, min(end, both))
    return out


def present(path: str) -> bool:
    return os.path.exists(os.path.join(path, DIR, INDEX))


class Stored:
    """A checkpoint's slices, read lazily: `read` opens only the files that hold what it asks for."""

    def __init__(self, path: str):
        self.root = os.path.join(path, DIR)
        with open(os.path.join(self.root, INDEX)) as f:
            index = json.load(f)
        self.params: dict[str, dict] = index["params"]
        self.step: int = index["optimizer_step"]
        self.lr_scheduler: Optional[dict] = index["lr_scheduler"]
        self.layout: dict = index["layout"]
        self._pieces: dict[tuple[str, str], list[Piece]] = {}
        for name, rows in index["pieces"].items():
            for kind, tp_rank, start, end, file, key in rows:
                self._pieces.setdefault((name, kind), []).append(Piece(name, kind, tp_rank, start, end, file, key))

    def has(self, name: str, kind: str) -> bool:
        return (name, kind) in self._pieces

    def read(self, name: str, kind: str, split_dim: Optional[int], tp_rank: int, tensor: int, start: int,
             end: int, shape: Optional[tuple[int, ...]] = None) -> torch.Tensor:
        """Elements [start, end) of part `tp_rank` of `tensor` of parameter `name` cut along `split_dim` (None: the
        whole parameter), flattened, in fp32. `shape`: the reader's global shape, whose vocabulary padding may
        differ from the checkpoint's (see the module docstring)."""
        meta = self.params[name]
        if shape is not None and list(shape) != meta["shape"]:
            return read_padded_rows(name, meta["shape"], shape, split_dim, start, end,
                                    lambda lo, hi: self.read(name, kind, split_dim, tp_rank, tensor, lo, hi))
        saved_cut = (meta["split_dim"], meta["tensor"]) if meta["split_dim"] is not None else (None, 1)
        if saved_cut == ((split_dim, tensor) if split_dim is not None else (None, 1)):
            return self._read_local(name, kind, tp_rank if split_dim is not None else 0, start, end)
        # another tensor-parallel cut: this one parameter whole, cut anew
        dim, parts = saved_cut
        part_shape = list(meta["shape"])
        if dim is not None:
            part_shape[dim] //= parts
        numel = int(torch.Size(part_shape).numel())
        whole = torch.cat([self._read_local(name, kind, t, 0, numel).view(part_shape) for t in range(parts)],
                          dim=dim or 0)
        if split_dim is not None:
            whole = whole.chunk(tensor, dim=split_dim)[tp_rank]
        return whole.reshape(-1)[start:end].clone()

    def full(self, name: str, kind: str = "fp32") -> torch.Tensor:
        """The whole parameter, in its global shape."""
        shape = self.params[name]["shape"]
        return self.read(name, kind, None, 0, 1, 0, int(torch.Size(shape).numel())).view(shape)

    def _read_local(self, name: str, kind: str, tp_rank: int, start: int, end: int) -> torch.Tensor:
        out = torch.empty(end - start, dtype=torch.float32)
        covered = 0
        overlapping: dict[str, list[tuple[Piece, int, int]]] = {}
        for p in self._pieces.get((name, kind), ()):
            lo, hi = max(start, p.start), min(end, p.end)
            if p.tp_rank == tp_rank and lo < hi:
                overlapping.setdefault(p.file, []).append((p, lo, hi))
                covered += hi - lo
        if covered != end - start:
            raise ValueError(f"{self.root}: {kind} of {name} (tensor part {tp_rank}) has {covered} of the "
                             f"{end - start} elements [{start}, {end}) this rank needs")
        for file, parts in overlapping.items():
            # opened for this read only: a mapped file's pages count as this process's memory while it is open
            with safe_open(os.path.join(self.root, file), framework="pt") as f:
                for p, lo, hi in parts:
                    out[lo - start:hi - start] = f.get_slice(p.key)[lo - p.start:hi - p.start]
        return out
