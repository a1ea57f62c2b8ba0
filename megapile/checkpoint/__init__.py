"""Checkpoints that survive a kill at any instant and resume exactly.

On disk, under `checkpoint.dir`:

    global_step300/            one complete checkpoint
        <DeepSpeed's files>    model/optimizer/scheduler shards, one set per rank
        megapile_state.json    step, global sample index, every rank's RNG streams, config, fingerprints
        manifest.json          every file with its size and CRC32; written last
    latest                     the tag of the newest complete checkpoint (DeepSpeed's format)

A save writes `global_stepN.tmp/`, has rank 0 checksum it into a manifest, fsyncs, renames the folder to
`global_stepN/` and only then replaces `latest`. A kill at any moment leaves either a `.tmp` folder
(ignored and later removed) or a complete checkpoint. A resume takes the newest folder whose manifest
verifies, so a damaged newest checkpoint falls back to the previous good one with a warning.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

from megapile.checkpoint import manifest, rng
from megapile.config import CheckpointConfig, ConfigError

STATE_FILE = "megapile_state.json"
_TAG = re.compile(r"^global_step(\d+)$")


@dataclass
class Found:
    """A complete, verified checkpoint and megapile's state stored with it."""

    path: str
    tag: str
    step: int
    state: dict[str, Any]


def checkpoint_dir(cfg: CheckpointConfig, run_dir: str) -> str:
    return cfg.dir or os.path.join(run_dir, "checkpoints")


def list_complete(directory: str) -> list[tuple[int, str]]:
    """(step, tag) of every finished checkpoint folder, newest first (not yet verified)."""
    if not os.path.isdir(directory):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(directory) if (m := _TAG.match(name))]
    return sorted(found, reverse=True)


def find_resumable(directory: str, checksums: bool = True, warn=None) -> Optional[Found]:
    """The newest checkpoint that verifies; damaged ones are reported through `warn` and skipped."""
    warn = warn or (lambda text: print(text, file=sys.stderr))
    for step, tag in list_complete(directory):
        path = os.path.join(directory, tag)
        problems = manifest.verify(path, checksums=checksums)
        if problems:
            warn(f"warning: skipping checkpoint {path}: {'; '.join(problems[:3])}")
            continue
        with open(os.path.join(path, STATE_FILE)) as f:
            return Found(path, tag, step, json.load(f))
    return None


def save(engine, directory: str, step: int, state: dict[str, Any], cfg: CheckpointConfig,
         is_main: bool) -> dict[str, float]:
    """Collective: every rank writes its shards, rank 0 seals the checkpoint. Returns timing figures."""
    import torch.distributed as dist

    tag = f"global_step{step}"
    tmp_tag, tmp, final = tag + ".tmp", os.path.join(directory, tag + ".tmp"), os.path.join(directory, tag)
    start = time.perf_counter()
    if is_main:
        os.makedirs(directory, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a save that was killed
    _barrier()
    with _torch_zip_crc_off():  # our manifest checksums every file; torch's per-record CRC32 costs ~35% of a save
        engine.save_checkpoint(directory, tag=tmp_tag, save_latest=False)
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, rng.capture())
    _barrier()  # every rank's shards are on disk before rank 0 seals them
    figures = {}
    if is_main:
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump({**state, "rng": states}, f)
        manifest.write(tmp)
        _replace_dir(tmp, final)
        manifest.fsync_dir(directory)
        _write_latest(directory, tag)
        prune(directory, cfg)
        seconds = time.perf_counter() - start
        size = manifest.total_bytes(final)
        figures = {"save_seconds": seconds, "save_mb": size / 1e6, "save_mb_per_s": size / 1e6 / max(seconds, 1e-9)}
    _barrier()
    return figures


def prune(directory: str, cfg: CheckpointConfig) -> list[str]:
    """Delete checkpoints beyond the newest `keep_last`, except every `keep_every`-th step and stale .tmp folders."""
    removed = []
    for step, tag in list_complete(directory)[cfg.keep_last:]:
        if cfg.keep_every and step % cfg.keep_every == 0:
            continue
        shutil.rmtree(os.path.join(directory, tag))
        removed.append(tag)
    newest = list_complete(directory)[0][0] if list_complete(directory) else None
    for name in os.listdir(directory):
        if name.endswith(".tmp") and (m := _TAG.match(name[:-4])) and newest is not None and int(m.group(1)) < newest:
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    return removed


def load(engine, found: Found, rank: int, world_size: int, load_optimizer: bool = True) -> None:
    """Load DeepSpeed's shards of `found` into the engine and this rank's RNG streams."""
    directory = os.path.dirname(found.path)
    path, _ = engine.load_checkpoint(directory, tag=found.tag, load_optimizer_states=load_optimizer,
                                     load_lr_scheduler_states=True, load_module_strict=True)
    if path is None:
        raise ConfigError(f"checkpoint {found.path}: DeepSpeed could not load it")
    states = found.state.get("rng") or []
    if len(states) == world_size:
        rng.restore(states[rank])


def _replace_dir(tmp: str, final: str) -> None:
    if os.path.exists(final):  # the same step saved again (e.g. a rerun): swap, never leave neither
        old = final + ".replaced"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)


def _write_latest(directory: str, tag: str) -> None:
    tmp = os.path.join(directory, "latest.tmp")
    with open(tmp, "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(directory, "latest"))
    manifest.fsync_dir(directory)


@contextlib.contextmanager
def _torch_zip_crc_off():
    try:
        from torch.utils.serialization import config
    except ImportError:  # torch < 2.6 has no switch
        yield
        return
    before = config.save.compute_crc32
    config.save.compute_crc32 = False
    try:
        yield
    finally:
        config.save.compute_crc32 = before


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
