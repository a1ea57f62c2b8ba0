"""`python -m megapile.runtime.build_ops`: build the DeepSpeed C++ ops a CPU run loads into the extension cache
(TORCH_EXTENSIONS_DIR) now, at install time, rather than during the first run that needs each: the gloo
shared-memory all-reduce (every `init_distributed` on CPU loads it) and CPU Adam (ZeRO offload). On a GPU machine
DeepSpeed builds what it needs for the GPU itself (or `DS_BUILD_OPS=1` at install); nothing is done there.
"""
from __future__ import annotations

import time

import torch


def main() -> int:
    if torch.cuda.is_available():
        print("megapile: a GPU machine: DeepSpeed builds its GPU ops itself; nothing to do")
        return 0
    from deepspeed.accelerator import get_accelerator
    from deepspeed.comm.torch import build_shm_op

    for name, build in (("shared-memory all-reduce", build_shm_op),
                        ("CPU Adam", lambda: get_accelerator().create_op_builder("CPUAdamBuilder").load())):
        start = time.perf_counter()
        build()
        print(f"megapile: DeepSpeed's {name} op is built ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
