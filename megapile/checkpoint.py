"""Save and resume through DeepSpeed's sharded checkpoints, plus megapile's own position in training.

DeepSpeed stores model, optimizer and scheduler shards; `client_state` adds what it does not know:
the step and the global sample index, so data resumes where it stopped.
"""
from __future__ import annotations

import os
from typing import Any, Optional

from megapile.config import CheckpointConfig, ConfigError


def checkpoint_dir(cfg: CheckpointConfig, run_dir: str) -> str:
    return cfg.dir or os.path.join(run_dir, "checkpoints")


def save(engine, directory: str, step: int, client_state: dict[str, Any]) -> str:
    """Write global_step{step}/ on every rank (collective) and point `latest` at it."""
    tag = f"global_step{step}"
    engine.save_checkpoint(directory, tag=tag, client_state=client_state)
    return os.path.join(directory, tag)


def resume(engine, cfg: CheckpointConfig, directory: str) -> Optional[dict[str, Any]]:
    """Load the checkpoint `cfg.resume` asks for; return its client state, or None to start fresh."""
    if cfg.resume == "none":
        return None
    if cfg.resume == "auto":
        if not os.path.exists(os.path.join(directory, "latest")):
            return None
        load_dir, tag = directory, None
    else:
        load_dir, tag = os.path.dirname(cfg.resume.rstrip("/")), os.path.basename(cfg.resume.rstrip("/"))
        if not os.path.isdir(cfg.resume):
            raise ConfigError(f"checkpoint.resume: {cfg.resume} is not a checkpoint directory")
    path, client_state = engine.load_checkpoint(load_dir, tag=tag)
    if path is None:
        raise ConfigError(f"checkpoint.resume: nothing loadable in {load_dir}")
    return client_state
