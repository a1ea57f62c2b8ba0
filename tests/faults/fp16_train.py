"""tests/faults/nan_train.py (same environment variables) in fp16 on CPU, and the loss scaler as a resume left it
(a test harness, not product code).

DeepSpeed refuses fp16 where the accelerator says it lacks it, as CPUs without oneDNN fp16 do; its CPU optimizers
run fp16 all the same, so the check is flipped here. After the resume every rank prints
`rank R loss scale after resume: <scale> dynamic <True|False>`.
"""
import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from deepspeed.accelerator import get_accelerator  # noqa: E402

from megapile.checkpoint import manager  # noqa: E402
from megapile.parallel import loss_scale  # noqa: E402

get_accelerator().is_fp16_supported = lambda: True

_original_resume = manager.resume


def resume(run):
    position = _original_resume(run)
    scaler = loss_scale.scaler(run.engine)
    if scaler is not None:
        sys.stdout.write(f"rank {os.environ.get('RANK', '0')} loss scale after resume: {scaler.cur_scale} "
                         f"dynamic {loss_scale.is_dynamic(scaler)}\n")
        sys.stdout.flush()
    return position


manager.resume = resume
sys.argv[0] = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nan_train.py")
runpy.run_path(sys.argv[0], run_name="__main__")
