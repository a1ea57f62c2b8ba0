"""Checkpoints that survive a kill at any instant and resume exactly.

On disk, under `checkpoint.dir`:

    global_step300/            one complete checkpoint
        portable/              every rank's slices of the fp32 masters and Adam moments, by parameter name and
                               position, and their index: a resume on any layout (megapile/checkpoint/fragments.py)
        megapile_state.json    format, step, global sample index, every rank's RNG streams, layout, config, fingerprints
        tokenizer/             a byte copy of the run's tokenizer file(s), so the checkpoint works wherever
                               it is copied (eval, generate, export-hf); its sha256 is the recorded fingerprint
        manifest.json          every file with its size and CRC32; written last
    latest                     the tag of the newest complete checkpoint (DeepSpeed's format)

A save (megapile/checkpoint/collective.py) writes `global_stepN.tmp/`; every rank fsyncs and checksums the files
it wrote, rank 0 writes the manifest from all of them, renames the folder to `global_stepN/` and only then
replaces `latest`. A kill at any moment leaves either a `.tmp` folder
(ignored and later removed) or a complete checkpoint. A resume takes the newest folder whose manifest
verifies, so a damaged newest checkpoint falls back to the previous good one with a warning.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Optional

from megapile.checkpoint import manifest, state_file
from megapile.checkpoint.state_file import STATE_FILE as STATE_FILE  # re-exported: tests and tools name it here
from megapile.checkpoint.state_file import TOKENIZER_DIR, RunState
from megapile.config import CheckpointConfig, ConfigError

ROLLBACK_FILE = "rolled_back/last_rollback.json"
_TAG = re.compile(r"^global_step(\d+)$")


@dataclass
class Found:
    """A complete, verified checkpoint and megapile's state stored with it."""

    path: str
    tag: str
    step: int
    state: RunState  # its megapile_state.json, upgraded to the current format (megapile/checkpoint/state_file.py)


def checkpoint_dir(cfg: CheckpointConfig, run_dir: str) -> str:
    return cfg.dir or os.path.join(run_dir, "checkpoints")


def list_complete(directory: str) -> list[tuple[int, str]]:
    """(step, tag) of every finished checkpoint folder, newest first (not yet verified)."""
    if not os.path.isdir(directory):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(directory) if (m := _TAG.match(name))]
    return sorted(found, reverse=True)


def open_checkpoint(path: str, checksums: bool = True) -> Found:
    """The checkpoint at `path` (a `global_stepN` folder), verified; ConfigError naming what is wrong."""
    path = os.path.normpath(path)
    m = _TAG.match(os.path.basename(path))
    if not m or not os.path.isdir(path):
        raise ConfigError(f"checkpoint.resume: {path} is not a complete, intact checkpoint: no such checkpoint "
                          "folder (expected .../global_stepN)")
    problems = manifest.verify(path, checksums=checksums)
    if problems:
        raise ConfigError(f"checkpoint.resume: {path} is not a complete, intact checkpoint: {'; '.join(problems[:3])}")
    return Found(path, os.path.basename(path), int(m.group(1)), state_file.read(path))


def set_aside_newer(directory: str, step: int) -> list[str]:
    """A rollback to `step`: move every checkpoint newer than it into `rolled_back/from_stepN_<time>/`, so a
    later automatic resume never picks the abandoned future, and nothing is deleted. Returns the tags moved."""
    newer = [tag for s, tag in list_complete(directory) if s > step]
    if not newer:
        return []
    aside = os.path.join(directory, "rolled_back", f"from_step{step}_{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(aside, exist_ok=True)
    for tag in newer:
        os.rename(os.path.join(directory, tag), os.path.join(aside, tag))
    with open(os.path.join(directory, ROLLBACK_FILE), "w") as f:
        json.dump({"path": os.path.normpath(os.path.abspath(os.path.join(directory, f"global_step{step}")))}, f)
    _write_latest(directory, f"global_step{step}")
    manifest.fsync_dir(directory)
    return newer


def rolled_back_to(directory: str) -> Optional[str]:
    """The checkpoint path of the last rollback in `directory`, if any: a restart of the same command (requeue)
    must go on from the newest checkpoint of the new branch, not roll back again."""
    try:
        with open(os.path.join(directory, ROLLBACK_FILE)) as f:
            return json.load(f)["path"]
    except (OSError, ValueError, KeyError):
        return None


def find_resumable(directory: str, checksums: bool = True, warn=None, at_most: Optional[int] = None) -> Optional[Found]:
    """The newest checkpoint (at step `at_most` or before, if given) that verifies; damaged ones are reported
    through `warn` and skipped."""
    warn = warn or (lambda text: print(text, file=sys.stderr))
    for step, tag in list_complete(directory):
        if at_most is not None and step > at_most:
            continue
        path = os.path.join(directory, tag)
        problems = manifest.verify(path, checksums=checksums)
        if problems:
            warn(f"warning: skipping checkpoint {path}: {'; '.join(problems[:3])}")
            continue
        return Found(path, tag, step, state_file.read(path))
    return None


class CheckpointError(RuntimeError):
    """A save failed (e.g. disk full); the previous checkpoint and `latest` are untouched. One-line message."""


def carried_tokenizer(path: str) -> Optional[str]:
    """The tokenizer folder checkpoint `path` carries, or None for one saved before checkpoints carried it."""
    carried = os.path.join(path, TOKENIZER_DIR)
    return carried if os.path.isdir(carried) else None


def check_writable(directory: str, rank: int) -> None:
    """Fail at start-up, on every rank, when checkpoints could never be written, not hours later."""
    probe = os.path.join(directory, f".write_probe_rank{rank}")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"checkpoint.dir: cannot write to {directory}: {e.strerror or e}") from None


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


