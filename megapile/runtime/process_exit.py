"""Leave a finished process with its own exit code.

DeepSpeed's ZeRO-3 on CPU (gloo) now and then aborts a process that has finished its work, at interpreter
teardown, with "terminate called without an active exception" (a C++ thread object destroyed while still
joinable during static destruction). Tearing down the engine and the process group first (train.train does)
makes it rarer, not impossible: CI once lost a good run to it. A job launcher reads that abort (-6) as a
failed rank and a SLURM job as failed, so the entry points end through `exit_now`: every Python-level sink
is flushed and closed here, then the process leaves without running C++ static destructors.
"""
from __future__ import annotations

import logging
import os
import sys


def exit_now(code: int) -> None:
    """Flush stdout/stderr and logging, finalize MPI if mpi4py started it, then `os._exit(code)`.

    Only for the end of a command-line entry point: nothing after this runs (atexit handlers included, so
    the caller must have closed its files, wandb and TensorBoard writers already; train.train does).
    """
    logging.shutdown()
    mpi = sys.modules.get("mpi4py.MPI")
    # mpirun counts a rank that exits without MPI_Finalize as failed; mpi4py would call it at exit
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing left to say there
            pass
    os._exit(int(code))
