"""One place that turns any launcher's environment into rank/world/master and starts the process group.

Launchers, in the order they are recognised (the first that matches wins):

    env     torchrun, the deepspeed launcher, slurm/train.sh, launch/*.sh: RANK, WORLD_SIZE, LOCAL_RANK,
            MASTER_ADDR, MASTER_PORT
    mpi     OpenMPI's mpirun (OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK) or MPICH/Intel MPI (PMI_RANK, PMI_SIZE,
            MPI_LOCALRANKID). The master is MASTER_ADDR/MASTER_PORT when set; otherwise rank 0's host name
            and a free port on it, broadcast with mpi4py; without mpi4py MASTER_ADDR is required.
    slurm   `srun python megapile/train.py` inside an allocation: SLURM_PROCID, SLURM_STEP_NUM_TASKS,
            SLURM_LOCALID; the master is the first host of the step's node list (`scontrol show hostnames`),
            the port derived from the job id (both overridable with MASTER_ADDR/MASTER_PORT)
    single  nothing set: a world of one

mpirun is checked before SLURM because a job step's variables leak into processes that mpirun starts inside
an allocation; SLURM counts only inside a job step (the batch shell itself has SLURM_PROCID=0 too).

torch and deepspeed are imported inside the functions that start or stop the process group (lazy): reading
the launcher's variables needs neither, and launch/hostfile.sh imports this module for `expand_nodelist` alone,
which takes ~0.02 s where torch would add ~1.5 s and deepspeed ~0.5 s more (and its accelerator line).
"""
from __future__ import annotations

import datetime
import os
import socket
import subprocess
import time
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
    launcher: str  # "env" (torchrun/deepspeed/scripts), "mpi", "slurm" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


DEFAULT_PORT = 29500
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 20000  # the port a SLURM job uses: base + job id % span


def detect(environ: Mapping[str, str]) -> DistEnv:
    """Read the launcher's variables; raise LaunchError when they contradict each other.

    Under mpirun without MASTER_ADDR this is a collective (an mpi4py broadcast): every rank must call it.
    """
    if "RANK" in environ or "WORLD_SIZE" in environ:
        rank, world, local = (_int(environ, k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        _check_ranks(rank, world, local, "RANK", "WORLD_SIZE", "LOCAL_RANK")
        addr, port = _env_master(environ, world, "the launcher must name the rank-0 host")
        return DistEnv(rank, world, local, addr, port, "env")
    for rank_key, size_key, local_key in (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
                                          ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID")):
        if rank_key in environ:
            rank, world, local = (_int(environ, k) for k in (rank_key, size_key, local_key))
            _check_ranks(rank, world, local, rank_key, size_key, local_key)
            addr, port = _mpi_master(environ, rank, world)
            return DistEnv(rank, world, local, addr, port, "mpi")
    if "SLURM_STEP_ID" in environ and "SLURM_PROCID" in environ:
        return _slurm(environ)
    return DistEnv(0, 1, 0, "127.0.0.1", _free_port(), "single")


def init(env: DistEnv, backend: str, timeout_s: float = 600.0) -> None:
    """Start torch.distributed through DeepSpeed (which every engine here needs) for this env.

    A master that cannot be resolved, a port already taken on rank 0, or a master that does not answer
    within `timeout_s` raises LaunchError with one line saying which.
    """
    os.environ.update(
        RANK=str(env.rank),
        WORLD_SIZE=str(env.world_size),
        LOCAL_RANK=str(env.local_rank),
        MASTER_ADDR=env.master_addr,
        MASTER_PORT=str(env.master_port),
    )
    if env.world_size > 1:
        try:
            socket.getaddrinfo(env.master_addr, env.master_port)
        except socket.gaierror as e:
            raise LaunchError(f"MASTER_ADDR={env.master_addr} does not resolve ({e.strerror})") from None
    if env.rank != 0:
        _wait_for_master(env, timeout_s)
    import deepspeed  # lazy: deepspeed, see the module docstring
    import torch.distributed as dist  # lazy: torch, see the module docstring

    _default_group_timeout(datetime.timedelta(seconds=timeout_s))
    if backend == "nccl":
        os.environ.update(nccl_error_handling(os.environ))
    try:
        deepspeed.init_distributed(
            dist_backend=backend,
            auto_mpi_discovery=False,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    except (dist.DistError, RuntimeError, TimeoutError) as e:
        where = f"{env.master_addr}:{env.master_port}"
        text = " ".join(str(e).split())
        if env.rank == 0 and ("address already in use" in text.lower() or "EADDRINUSE" in text):
            raise LaunchError(f"rank 0 cannot listen on {where}: MASTER_PORT {env.master_port} is in use "
                              "(pick another MASTER_PORT)") from None
        raise LaunchError(f"rank {env.rank}/{env.world_size} could not join the process group at {where} within "
                          f"{timeout_s:g} s (is rank 0 running, and MASTER_ADDR/MASTER_PORT reachable from here?): "
                          f"{text[:300]}") from None


def _default_group_timeout(timeout: datetime.timedelta) -> None:
    """Make every process group created after this one time out like the world group.

    DeepSpeed builds its own groups (a clone of the world group for ZeRO's gradient reduction, the data-,
    tensor- and pipeline-parallel groups) with `new_group(ranks)` and no timeout, which torch fills with its
    module default (30 min on gloo, 10 on nccl): a stopped rank would then hang the job for that long instead
    of train.collective_timeout_s. torch offers no argument to change it, so the module default is set.
    """
    from torch.distributed import distributed_c10d  # lazy: torch, see the module docstring

    distributed_c10d.default_pg_timeout = timeout
    distributed_c10d.default_pg_nccl_timeout = timeout


# NCCL's failure handling, chosen so a hung or dead rank ends the same way as on gloo: one line, exit 1, resume on
# restart. torch's default (3, SkipCleanUp) has the watchdog abort the whole process on a timeout, with its own
# multi-line report and none of ours; 2 (CleanUpOnly) aborts the communicators instead, which releases the stuck
# kernels, and the next wait or collective raises DistBackendError in the training thread (`collective_failed`).
# Blocking waits (TORCH_NCCL_BLOCKING_WAIT=1) would raise there too, but make the host wait out every collective,
# so they stay off. torch's heartbeat monitor still kills a process whose watchdog itself is stuck.
NCCL_ERROR_HANDLING = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "2", "TORCH_NCCL_BLOCKING_WAIT": "0"}


def nccl_error_handling(environ: Mapping[str, str]) -> dict[str, str]:
    """The NCCL settings to add to `environ` before the process group starts: NCCL_ERROR_HANDLING, except what
    the user set (under either the TORCH_ or the older NCCL_ name), which wins."""
    return {key: value for key, value in NCCL_ERROR_HANDLING.items()
            if key not in environ and key.removeprefix("TORCH_") not in environ}


def _wait_for_master(env: DistEnv, timeout_s: float) -> None:
    """Poll rank 0's port until it accepts a connection: a clean one-line error instead of c10d's retry log."""
    deadline = time.monotonic() + timeout_s
    last: OSError | None = None
    while True:
        try:
            with socket.create_connection((env.master_addr, env.master_port), timeout=min(5.0, timeout_s)):
                return
        except OSError as e:
            last = e
        if time.monotonic() >= deadline:
            raise LaunchError(f"rank {env.rank}/{env.world_size}: the master {env.master_addr}:{env.master_port} did not "
                              f"answer within {timeout_s:g} s ({last.strerror or last}); is rank 0 running, and "
                              "MASTER_ADDR/MASTER_PORT reachable from this host?")
        time.sleep(0.5)


def local_device(env: DistEnv, environ: Mapping[str, str]):
    """This rank's torch device: the GPU `cuda_ordinal` picks when CUDA is available, else the CPU."""
    import torch  # lazy: torch, see the module docstring

    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", cuda_ordinal(env.local_rank, torch.cuda.device_count(),
                                             environ.get("CUDA_VISIBLE_DEVICES")))


def cuda_ordinal(local_rank: int, visible: int, cuda_visible_devices: str | None) -> int:
    """Which of the `visible` GPUs this process uses. One visible GPU is this task's own (srun --gpus-per-task=1,
    or CUDA_VISIBLE_DEVICES set per task): ordinal 0 whatever LOCAL_RANK says. Otherwise the node's GPUs are
    shared by its ranks: ordinal LOCAL_RANK, which must exist."""
    if visible == 1:
        return 0
    if 0 <= local_rank < visible:
        return local_rank
    raise LaunchError(f"LOCAL_RANK={local_rank} but this process sees {visible} GPUs "
                      f"(CUDA_VISIBLE_DEVICES={cuda_visible_devices or 'unset'}): give each task one GPU of its own, "
                      "or every task all of the node's GPUs")


def shutdown(healthy: bool = True) -> None:
    """Tear the process group down in order, so a finished run exits with status 0. After a failed collective
    (`collective_failed`) the group is broken: nothing more is sent on it (a barrier would wait for a dead rank),
    and the process leaves through megapile.runtime.process_exit without tearing it down."""
    import torch.distributed as dist  # lazy: torch, see the module docstring

    if healthy and dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# What a collective raises, lower-cased, when another rank hung or died: gloo's and NCCL's timeouts (NCCL's with
# blocking wait, or its watchdog), gloo's broken connections, NCCL's remote and system errors.
COLLECTIVE_FAILURES = ("timed out", "timeout", "connection closed by peer", "connection reset by peer",
                       "nccl error", "ncclremoteerror", "ncclsystemerror", "nccl communicator was aborted")


def collective_failed(error: BaseException) -> bool:
    """Whether `error` is a collective that failed because another rank stopped responding or died (gloo or
    NCCL), which a restart resumes from, rather than a bug."""
    import torch.distributed as dist  # lazy: torch, see the module docstring

    if isinstance(error, dist.DistBackendError):  # NCCL's failures, the watchdog's timeout among them
        return True
    return isinstance(error, RuntimeError) and any(k in str(error).lower() for k in COLLECTIVE_FAILURES)


def slurm_hostnames(nodelist: str) -> list[str]:
    """Expand a SLURM node list (`node[01-04],gpu7`) with `scontrol show hostnames`, or, where scontrol is
    missing or has no configuration, with `expand_nodelist`."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=60)
        hosts = out.stdout.split() if out.returncode == 0 else []
    except (OSError, subprocess.TimeoutExpired):
        hosts = []
    return hosts or expand_nodelist(nodelist)


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's host list syntax without scontrol: `gpu[01-03,07],login1`, `rack[1-2]-n[1-2]`."""
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        hosts += _expand_one(item, nodelist)
    if not hosts:
        raise LaunchError(f"SLURM node list {nodelist!r} is empty; set MASTER_ADDR")
    return hosts


def _split_top_level(text: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item for item in items if item]


def _expand_one(item: str, whole: str) -> list[str]:
    if "[" not in item:
        return [item]
    head, _, rest = item.partition("[")
    body, sep, tail = rest.partition("]")
    if not sep:
        raise LaunchError(f"SLURM node list {whole!r}: unbalanced '['; set MASTER_ADDR")
    names = []
    for part in body.split(","):
        lo, dash, hi = part.partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()):
            raise LaunchError(f"SLURM node list {whole!r}: bad range {part!r}; set MASTER_ADDR")
        for n in range(int(lo), int(hi or lo) + 1):
            names.append(f"{head}{n:0{len(lo)}d}")
    return [name + t for name in names for t in _expand_one(tail, whole)] if tail else names


def slurm_port(job_id: str) -> int:
    """The rendezvous port of a SLURM job: fixed by its job id, so every node computes the same one."""
    try:
        return SLURM_PORT_BASE + int(job_id) % SLURM_PORT_SPAN
    except ValueError:
        raise LaunchError(f"SLURM_JOB_ID={job_id!r} is not an integer") from None


def _slurm(environ: Mapping[str, str]) -> DistEnv:
    world_key = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in environ else "SLURM_NTASKS"
    rank, world, local = (_int(environ, k) for k in ("SLURM_PROCID", world_key, "SLURM_LOCALID"))
    _check_ranks(rank, world, local, "SLURM_PROCID", world_key, "SLURM_LOCALID")
    if "MASTER_ADDR" in environ:
        addr = environ["MASTER_ADDR"]
    elif world == 1:
        addr = "127.0.0.1"
    else:
        nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
        if not nodelist:
            raise LaunchError("SLURM_STEP_NODELIST/SLURM_JOB_NODELIST are not set: cannot find the rank-0 host; "
                              "set MASTER_ADDR")
        addr = slurm_hostnames(nodelist)[0]
    if "MASTER_PORT" in environ:
        port = _port(environ)
    else:
        port = slurm_port(environ["SLURM_JOB_ID"]) if "SLURM_JOB_ID" in environ else DEFAULT_PORT
    return DistEnv(rank, world, local, addr, port, "slurm")


def _mpi_master(environ: Mapping[str, str], rank: int, world: int) -> tuple[str, int]:
    if "MASTER_ADDR" in environ or world == 1:
        return _env_master(environ, world, "")
    try:
        from mpi4py import MPI  # lazy: importing it starts MPI (MPI_Init); only mpirun without MASTER_ADDR needs it
    except ImportError:
        raise LaunchError("MASTER_ADDR is not set under mpirun and mpi4py is not installed to agree on one: "
                          "pass -x MASTER_ADDR=<rank-0 host> (and -x MASTER_PORT) or pip install mpi4py") from None
    comm = MPI.COMM_WORLD
    if comm.Get_size() != world or comm.Get_rank() != rank:
        raise LaunchError(f"mpi4py sees rank {comm.Get_rank()} of {comm.Get_size()}, the environment rank {rank} "
                          f"of {world}: mpi4py is built against another MPI than the mpirun that started this")
    if rank == 0:
        port = _port(environ) if "MASTER_PORT" in environ else _free_port("")
        master = (_routable_host(), port)
    else:
        master = None
    addr, port = comm.bcast(master, root=0)
    return addr, port


def _routable_host() -> str:
    """This host's name if it resolves, else its address: what other nodes use to reach rank 0."""
    name = socket.gethostname()
    try:
        socket.getaddrinfo(name, None)
        return name
    except socket.gaierror:
        return "127.0.0.1"


def _env_master(environ: Mapping[str, str], world: int, why: str) -> tuple[str, int]:
    if world > 1 and "MASTER_ADDR" not in environ:
        raise LaunchError("MASTER_ADDR is not set" + (f": {why}" if why else ""))
    if "MASTER_ADDR" in environ and not environ["MASTER_ADDR"].strip():
        raise LaunchError("MASTER_ADDR is empty")
    port = _port(environ) if "MASTER_PORT" in environ else DEFAULT_PORT
    return environ.get("MASTER_ADDR", "127.0.0.1"), port


def _check_ranks(rank: int, world: int, local: int, rank_key: str, world_key: str, local_key: str) -> None:
    if world < 1:
        raise LaunchError(f"{world_key}={world}: the world needs at least one process")
    if not 0 <= rank < world:
        raise LaunchError(f"{rank_key}={rank} is not within {world_key}={world} (ranks are 0..{world - 1})")
    if not 0 <= local <= rank:
        raise LaunchError(f"{local_key}={local} is impossible for {rank_key}={rank} (0 <= local rank <= rank)")


def _port(environ: Mapping[str, str]) -> int:
    port = _int(environ, "MASTER_PORT")
    if not 0 < port < 65536:
        raise LaunchError(f"MASTER_PORT={port} is not a TCP port (1..65535)")
    return port


def _int(environ: Mapping[str, str], key: str) -> int:
    if key not in environ:
        raise LaunchError(f"{key} is not set while other launcher variables are")
    try:
        return int(environ[key])
    except ValueError:
        raise LaunchError(f"{key}={environ[key]!r} is not an integer") from None


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
