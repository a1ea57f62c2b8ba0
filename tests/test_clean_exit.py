"""A finished run exits with its own code, never with an abort from interpreter teardown.

DeepSpeed's ZeRO-3 on CPU can abort a finished process at interpreter exit ("terminate called without an
active exception"), which turns a good run into a failed job. The entry points therefore leave through
megapile.runtime.process_exit.exit_now. Teardown aborts are rare, so the wiring is tested with a teardown that always
aborts (an atexit handler calling os.abort): an entry point that still ran teardown would exit -6. On the real
engine, every process a test starts through tests/harness.py (the ZeRO-3 runs of the matrix, the layout grid,
the kill campaign ...) fails its test if any rank printed "terminate called".
"""
import os
import subprocess
import sys

import pytest
from train_helpers import ROOT, TRAIN

ABORT_AT_TEARDOWN = "import atexit, os, runpy, sys; atexit.register(os.abort); "


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", ABORT_AT_TEARDOWN + code, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))


def test_exit_now_skips_teardown_and_flushes_output():
    proc = _python("from megapile.runtime.process_exit import exit_now; "
                   "sys.stdout.write('unflushed'); sys.stderr.write('also'); exit_now(3)")
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "unflushed", "also")
    # the control: the same teardown without exit_now is an abort
    assert _python("sys.exit(3)").returncode == -6


@pytest.mark.parametrize("entry", ["train.py", "megapile console script", "nan_train harness"])
def test_entry_points_end_with_their_own_exit_code(entry, tmp_path):
    """A config error returns 1 from main(); each entry point must exit 1, not abort in teardown."""
    args = ["--config", str(tmp_path / "missing.yaml")]
    run = {
        "train.py": f"sys.argv = [{TRAIN!r}] + sys.argv[1:]; runpy.run_path({TRAIN!r}, run_name='__main__')",
        "megapile console script": "from importlib.metadata import entry_points; "
                                   "script = entry_points(group='console_scripts')['megapile'].load(); "
                                   "sys.argv = ['megapile', 'train'] + sys.argv[1:]; script()",
        "nan_train harness": "h = os.path.join('tests', 'faults', 'nan_train.py'); sys.argv = [h] + sys.argv[1:]; "
                             "runpy.run_path(h, run_name='__main__')",
    }[entry]
    proc = _python(run, *args)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "missing.yaml" in proc.stderr
