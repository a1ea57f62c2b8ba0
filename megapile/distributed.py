"""One place that turns any launcher's environment into rank/world/master and starts the process group.

torchrun and the deepspeed launcher set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; OpenMPI's
mpirun sets OMPI_COMM_WORLD_*; a plain `python megapile/train.py` sets nothing and runs as a world of one.
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Mapping


class LaunchError(RuntimeError):
    """The launcher environment is inconsistent; the message is one line."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "env" (torchrun/deepspeed), "mpi" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect(environ: Mapping[str, str]) -> DistEnv:
    """Read the launcher's variables; raise LaunchError when they contradict each other."""
    if "RANK" in environ or "WORLD_SIZE" in environ:
        rank, world, local = (_int(environ, k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        launcher = "env"
    elif "OMPI_COMM_WORLD_RANK" in environ:
        rank = _int(environ, "OMPI_COMM_WORLD_RANK")
        world = _int(environ, "OMPI_COMM_WORLD_SIZE")
        local = _int(environ, "OMPI_COMM_WORLD_LOCAL_RANK")
        launcher = "mpi"
    else:
        return DistEnv(0, 1, 0, "127.0.0.1", _free_port(), "single")
    if world < 1 or not 0 <= rank < world:
        raise LaunchError(f"rank {rank} is not within world size {world}")
    if world > 1 and "MASTER_ADDR" not in environ:
        raise LaunchError("MASTER_ADDR is not set: the launcher must name the rank-0 host")
    addr = environ.get("MASTER_ADDR", "127.0.0.1")
    port = _int(environ, "MASTER_PORT") if "MASTER_PORT" in environ else 29500
    return DistEnv(rank, world, local, addr, port, launcher)


def init(env: DistEnv, backend: str, timeout_s: float = 600.0) -> None:
    """Start torch.distributed through DeepSpeed (which every engine here needs) for this env."""
    os.environ.update(
        RANK=str(env.rank),
        WORLD_SIZE=str(env.world_size),
        LOCAL_RANK=str(env.local_rank),
        MASTER_ADDR=env.master_addr,
        MASTER_PORT=str(env.master_port),
    )
    import deepspeed

    deepspeed.init_distributed(
        dist_backend=backend,
        auto_mpi_discovery=False,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def shutdown() -> None:
    """Tear the process group down in order, so a finished run exits with status 0."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _int(environ: Mapping[str, str], key: str) -> int:
    if key not in environ:
        raise LaunchError(f"{key} is not set while other launcher variables are")
    try:
        return int(environ[key])
    except ValueError:
        raise LaunchError(f"{key}={environ[key]!r} is not an integer") from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
