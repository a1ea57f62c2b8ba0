"""A training run's checkpoint save and load: collective, every rank writing and sealing its own part.

A save writes `global_stepN.tmp/`: every rank's slices of the fp32 masters and Adam moments (megapile/checkpoint/
fragments.py), megapile's state (with DeepSpeed's step counters and loss scale) and the carried tokenizer. Every
rank then fsyncs and checksums the files it wrote, in parallel, and rank 0 writes the manifest from all of them,
renames the folder to `global_stepN/` and only then replaces `latest` (megapile/checkpoint/__init__.py describes
the folder and why a kill at any instant leaves the previous checkpoint loadable). DeepSpeed's own checkpoint is
not written: the slices hold everything it would (the module's weights are the masters, rounded as DeepSpeed
rounds them after each step), and it could only be loaded on the layout that wrote it.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch.distributed as dist

from megapile.checkpoint import (
    STATE_FILE,
    CheckpointError,
    Found,
    _replace_dir,
    _write_latest,
    fragments,
    manifest,
    prune,
    rng,
)
from megapile.checkpoint import slices as slices_access
from megapile.config import CheckpointConfig, ConfigError
from megapile.models import TensorPlan
from megapile.parallel import loss_scale
from megapile.parallel.layout import Layout


@dataclass
class Slices:
    """What a save needs to write the layout-free slices (megapile/checkpoint/fragments.py)."""

    layout: Layout
    rank: int
    num_layers: int
    plan: TensorPlan  # the model family's tensor-parallel plan: which parameters are split, along which dim


def save(engine, directory: str, step: int, state: dict[str, Any], cfg: CheckpointConfig,
         is_main: bool, slices: Slices, files: Optional[dict[str, bytes]] = None,
         show_progress: bool = False) -> dict[str, float]:
    """Collective: every rank writes its slices (megapile/checkpoint/fragments.py), then checksums and fsyncs its
    share of the files; rank 0 writes the state, index and manifest and renames. Returns timing figures.

    `files` ({relative path: contents}) are written by rank 0 into the checkpoint too, under the manifest.

    A write that fails on any rank (disk full, I/O error) fails the save on every rank with CheckpointError,
    after removing the partial `.tmp` folder; nothing that existed before is touched.
    """
    tag = f"global_step{step}"
    tmp, final = os.path.join(directory, tag + ".tmp"), os.path.join(directory, tag)
    start = time.perf_counter()
    error = None
    if is_main:
        try:
            os.makedirs(directory, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # left by a save that was killed
            os.makedirs(tmp)
        except OSError as e:
            error = e
    _raise_if_any_failed(error, tag, tmp, is_main)
    written, step = ([], {}), 0
    try:
        accessor = slices_access.holder(engine)
        params = slices_access.held(engine, slices.layout, slices.rank, slices.num_layers, slices.plan)
        written = fragments.write(accessor, params, slices.layout, slices.rank, tmp)
        step = slices_access.optimizer_step(accessor)
    except Exception as e:  # noqa: BLE001 (safetensors reports I/O errors as its own SafetensorError)
        error = _as_os_error(e, directory)
    gathered = _gather((rng.capture(), written))
    _raise_if_any_failed(error, tag, tmp, is_main)  # every rank's files are on disk past this point
    if is_main:
        try:
            _write_shared_files(engine, tmp, {**state, "rng": [g[0] for g in gathered]}, files or {},
                                [g[1] for g in gathered], step, slices.layout)
        except OSError as e:
            error = e
    _raise_if_any_failed(error, tag, tmp, is_main)
    _seal(tmp, slices, is_main, show_progress)
    figures = {}
    if is_main:
        try:
            _replace_dir(tmp, final)
            manifest.fsync_dir(directory)
        except OSError as e:
            error = e
    _raise_if_any_failed(error, tag, tmp, is_main)
    if is_main:
        # The checkpoint is complete and found by a directory scan from here on; a failure to update
        # `latest` or to prune old checkpoints is reported but does not undo it.
        try:
            _write_latest(directory, tag)
            prune(directory, cfg)
        except OSError as e:
            print(f"warning: checkpoint {final} is complete, but updating latest/pruning failed: {e}", file=sys.stderr)
        seconds = time.perf_counter() - start
        size = manifest.total_bytes(final)
        figures = {"save_seconds": seconds, "save_mb": size / 1e6, "save_mb_per_s": size / 1e6 / max(seconds, 1e-9)}
    _barrier()
    return figures


def _write_shared_files(engine, tmp: str, state: dict[str, Any], files: dict[str, bytes], written: list,
                        optimizer_step: int, layout: Layout) -> None:
    """Rank 0's part: megapile's state (with DeepSpeed's counters), the carried files, the slices' index."""
    with open(os.path.join(tmp, STATE_FILE), "w") as f:
        json.dump({**state, "engine": _engine_state(engine)}, f)
    for rel, data in files.items():
        os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
        with open(os.path.join(tmp, rel), "wb") as f:
            f.write(data)
    scheduler = engine.lr_scheduler.state_dict() if engine.lr_scheduler else None
    fragments.write_index(tmp, written, optimizer_step, scheduler, layout.as_dict())


def _seal(tmp: str, slices: Slices, is_main: bool, show_progress: bool) -> None:
    """Every rank fsyncs and checksums its share of the files (the ones it wrote, where the name says which), in
    parallel; rank 0 lists and shares them out and writes the manifest from all shares. A failure fails the save
    on every rank."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    error, entries, plan = None, {}, [None]
    if is_main:
        try:
            plan = [manifest.shares(tmp, manifest.files(tmp), world, _writer)]
        except OSError as e:
            error = e
    if dist.is_initialized():
        dist.broadcast_object_list(plan, src=0)
    try:
        entries = manifest.seal(tmp, plan[0][slices.rank], show_progress and is_main) if plan[0] else {}
    except OSError as e:
        error = e
    gathered = _gather(entries)
    if is_main and error is None:
        try:
            manifest.write_entries(tmp, {rel: e for part in gathered for rel, e in part.items()})
        except OSError as e:
            error = e
    _raise_if_any_failed(error, os.path.basename(tmp)[:-len(".tmp")], tmp, is_main)


_SLICE_FILE = re.compile(rf"^{fragments.DIR}/rank(\d+)-\d+\.safetensors$")


def _writer(rel: str) -> Optional[int]:
    """The rank that wrote file `rel`, when its name says (its slices); None for the rest."""
    m = _SLICE_FILE.match(rel)
    return int(m.group(1)) if m else None


def _as_os_error(error: Exception, directory: str) -> OSError:
    if isinstance(error, OSError):
        return error
    free = shutil.disk_usage(directory).free
    reason = os.strerror(errno.ENOSPC) if free < (1 << 20) else f"write failed: {error}"
    return OSError(errno.ENOSPC if free < (1 << 20) else errno.EIO, f"{reason}, {free / 1e6:.1f} MB free", directory)


def _gather(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _raise_if_any_failed(error: Optional[OSError], tag: str, tmp: str, is_main: bool) -> None:
    """Collective: if any rank failed, every rank raises the same CheckpointError (rank 0 cleans up)."""
    errors = _gather(None if error is None else f"{error.strerror or error} ({getattr(error, 'filename', '') or ''})")
    failed = [(rank, e) for rank, e in enumerate(errors) if e is not None]
    if not failed:
        return
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    rank, text = failed[0]
    raise CheckpointError(f"saving {tag} failed on rank {rank}: {text}; the previous checkpoint and 'latest' are untouched")


def load(engine, found: Found, slices: Slices, show_progress: bool = False) -> None:
    """Fill a freshly built engine of any layout from `found`'s slices: the fp32 masters and Adam moments each rank's
    optimizer holds, the module's copy of the weights, Adam's step, the LR schedule and the engine's counters and
    loss scale. The RNG streams are the caller's: they follow only onto the same layout."""
    slices_access.load(engine, fragments.Stored(found.path), slices.layout, slices.rank, slices.num_layers,
                       slices.plan, show_progress)
    _restore_engine_state(engine, found.state.engine, found.state.dtype)


def restore_rng(found: Found, rank: int, world_size: int) -> None:
    """This rank's RNG streams as saved: on the layout that wrote the checkpoint, every stream goes on."""
    states = found.state.rng
    if len(states) == world_size:
        rng.restore(states[rank])


def load_deepspeed_shards(engine, found: Found, rank: int, world_size: int) -> None:
    """A checkpoint saved before megapile wrote slices (DeepSpeed's shards), on the layout that wrote it."""
    directory = os.path.dirname(found.path)
    path, _ = engine.load_checkpoint(directory, tag=found.tag, load_optimizer_states=True,
                                     load_lr_scheduler_states=True, load_module_strict=True)
    if path is None:
        raise ConfigError(f"checkpoint {found.path}: DeepSpeed could not load it")
    restore_rng(found, rank, world_size)


_COUNTERS = ("global_steps", "global_samples", "skipped_steps")


def _engine_state(engine) -> dict[str, Any]:
    """What DeepSpeed's own checkpoint would add: its step counters, and the loss scaler's state (fp16's dynamic
    scale; a constant 1 in fp32 and bf16)."""
    scaler = loss_scale.scaler(engine)
    return {**{k: int(getattr(engine, k, 0)) for k in _COUNTERS},
            "loss_scaler": {k: v for k, v in vars(scaler).items()
                            if isinstance(v, (bool, int, float))} if scaler is not None else {}}


def _restore_engine_state(engine, state: dict[str, Any], saved_dtype: Optional[str]) -> None:
    """The counters always; fp16's loss scale only from an fp16 checkpoint (`saved_dtype` None: saved before
    checkpoints recorded it, when a dynamic scaler says fp16). fp32 and bf16 save a static scale of 1, which
    as fp16's scale would overflow at its minimum within two steps: fp16 then starts at its initial scale."""
    for key in _COUNTERS:
        if key in state:
            setattr(engine, key, state[key])
    if saved_dtype in ("fp16", None):
        loss_scale.restore(engine, state.get("loss_scaler") or {})


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
