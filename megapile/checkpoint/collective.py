"""A training run's checkpoint save and load: collective, every rank writing and sealing its own part.

A save has three parts. `stage` (collective, on the training thread): rank 0 makes `global_stepN.tmp/`, every rank
takes its slices of the fp32 masters and Adam moments (megapile/checkpoint/fragments.py) and its RNG streams,
rank 0 renders megapile's state (with DeepSpeed's step counters and loss scale), the slices' index and the carried
tokenizer. `write` (no collective): every rank writes its files, fsyncs and checksums them. `commit`
(collective): rank 0 writes the manifest from every rank's entries, renames the folder to `global_stepN/` and
only then replaces `latest` (megapile/checkpoint/__init__.py describes the folder and why a kill at any instant
leaves the previous checkpoint loadable). A synchronous save runs the three in a row; an asynchronous one
(megapile/checkpoint/background.py) copies the slices at `stage`, runs `write` on a background thread and
commits at a later step. DeepSpeed's own checkpoint is not written: the slices hold everything it would (the
module's weights are the masters, rounded as DeepSpeed rounds them after each step), and it could only be loaded
on the layout that wrote it.
"""
from __future__ import annotations

import errno
import json
import os
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


@dataclass
class Staged:
    """A save between its snapshot (`stage`) and its commit: what this rank writes, and where."""

    directory: str
    tag: str
    started: float  # time.perf_counter() at the snapshot
    files: list  # this rank's slice files: [(name under portable/, {key: tensor})] (fragments.collect)
    shared: dict[str, bytes]  # rank 0's: the state file, the slices' index and the carried files, by relative path

    @property
    def tmp(self) -> str:
        return os.path.join(self.directory, self.tag + ".tmp")

    @property
    def final(self) -> str:
        return os.path.join(self.directory, self.tag)


def save(engine, directory: str, step: int, state: dict[str, Any], cfg: CheckpointConfig,
         is_main: bool, slices: Slices, files: Optional[dict[str, bytes]] = None,
         show_progress: bool = False) -> dict[str, float]:
    """Collective: `stage`, `write` and `commit` in a row (a synchronous save). Returns timing figures.

    A write that fails on any rank (disk full, I/O error) fails the save on every rank with CheckpointError,
    after removing the partial `.tmp` folder; nothing that existed before is touched.
    """
    staged = stage(engine, directory, step, state, is_main, slices, files)
    written = write(staged, show_progress and is_main)
    return commit(staged, written, cfg, is_main)


def stage(engine, directory: str, step: int, state: dict[str, Any], is_main: bool, slices: Slices,
          files: Optional[dict[str, bytes]] = None, buffers: Optional[fragments.Buffers] = None) -> Staged:
    """Collective, on the training thread: rank 0 makes `global_stepN.tmp/`; every rank takes its slices of the fp32
    masters and Adam moments (copied into `buffers` when given: an asynchronous save's snapshot, which training may
    then change) and its RNG streams; rank 0 renders megapile's state, the slices' index and the carried `files`
    ({relative path: contents}) to bytes. Nothing is written yet but the empty folder."""
    tag = f"global_step{step}"
    staged = Staged(directory, tag, time.perf_counter(), [], {})
    error = None
    if is_main:
        try:
            os.makedirs(directory, exist_ok=True)
            shutil.rmtree(staged.tmp, ignore_errors=True)  # left by a save that was killed
            os.makedirs(os.path.join(staged.tmp, fragments.DIR))
        except OSError as e:
            error = e
    _raise_if_any_failed(error, tag, staged.tmp, is_main)
    accessor = slices_access.holder(engine)
    params = slices_access.held(engine, slices.layout, slices.rank, slices.num_layers, slices.plan)
    pieces, described, staged.files = fragments.collect(accessor, params, slices.layout, slices.rank, buffers)
    gathered = _gather((rng.capture(), (pieces, described)))
    if is_main:
        scheduler = engine.lr_scheduler.state_dict() if engine.lr_scheduler else None
        index = fragments.index_of([g[1] for g in gathered], slices_access.optimizer_step(accessor), scheduler,
                                   slices.layout.as_dict())
        staged.shared = {
            STATE_FILE: json.dumps({**state, "rng": [g[0] for g in gathered], "engine": _engine_state(engine)}).encode(),
            f"{fragments.DIR}/{fragments.INDEX}": json.dumps(index).encode(),
            **(files or {}),
        }
    return staged


def write(staged: Staged, show_progress: bool = False) -> tuple[dict[str, dict], Optional[OSError]]:
    """No collective (an asynchronous save runs it on a background thread): write this rank's files into the
    `.tmp` folder, fsync and checksum them. Returns their manifest entries, or the error that stopped it."""
    try:
        rels = fragments.write_files(staged.tmp, staged.files)
        for rel, data in staged.shared.items():
            path = os.path.join(staged.tmp, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
            rels.append(rel)
        return manifest.seal(staged.tmp, rels, show_progress), None
    except Exception as e:  # noqa: BLE001 (safetensors reports I/O errors as its own SafetensorError)
        return {}, _as_os_error(e, staged.directory)


def commit(staged: Staged, written: tuple[dict[str, dict], Optional[OSError]], cfg: CheckpointConfig,
           is_main: bool, prune_now: bool = True) -> dict[str, float]:
    """Collective, on the training thread, once every rank's `write` has returned: rank 0 writes the manifest from
    every rank's entries, renames the folder to `global_stepN/` and only then replaces `latest` and prunes (unless
    not `prune_now`: the caller prunes, e.g. on a background thread). A rank's failed write fails the save on
    every rank (CheckpointError; the `.tmp` folder removed)."""
    entries, error = written
    _raise_if_any_failed(error, staged.tag, staged.tmp, is_main)
    gathered = _gather(entries)
    if is_main:
        try:
            manifest.write_entries(staged.tmp, {rel: e for part in gathered for rel, e in part.items()})
            _replace_dir(staged.tmp, staged.final)
            manifest.fsync_dir(staged.directory)
        except OSError as e:
            error = e
    _raise_if_any_failed(error, staged.tag, staged.tmp, is_main)
    figures = {}
    if is_main:
        # The checkpoint is complete and found by a directory scan from here on; a failure to update
        # `latest` or to prune old checkpoints is reported but does not undo it.
        try:
            _write_latest(staged.directory, staged.tag)
            if prune_now:
                prune(staged.directory, cfg)
        except OSError as e:
            print(f"warning: checkpoint {staged.final} is complete, but updating latest/pruning failed: {e}",
                  file=sys.stderr)
        seconds = time.perf_counter() - staged.started
        size = manifest.total_bytes(staged.final)
        figures = {"save_seconds": seconds, "save_mb": size / 1e6, "save_mb_per_s": size / 1e6 / max(seconds, 1e-9)}
    _barrier()
    return figures


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
