"""Leave a finished process with its own exit code.

DeepSpeed's ZeRO-3 on CPU (gloo) now and then aborts a process that has finished its work, at interpreter
teardown, with "terminate called without an active exception" (a C++ thread object destroyed while still
joinable during static destruction). Tearing down the engine and the process group first (train.train does)
makes it rarer, not impossible: CI once lost a good run to it. A job launcher reads that abort (-6) as a
failed rank and a SLURM job as failed, so the entry points end through `exit_now`: every Python-level sink
is flushed and closed here, then the process leaves without running C++ static destructors.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time


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


def say_error(line: str) -> None:
    """Print a one-line error to stderr, and hand it to torchrun when it started this process: torchrun's own
    report of the failed job (printed after ours) then shows this line as the root cause, where it would say
    "error_file: <N/A>" and point at its docs (torch.distributed.elastic reads TORCHELASTIC_ERROR_FILE)."""
    print(line, file=sys.stderr, flush=True)
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        try:
            with open(path, "w") as f:
                json.dump({"message": line, "timestamp": int(time.time())}, f)
        except OSError:
            pass  # the report only loses our line; the error itself is printed above
