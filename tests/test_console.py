"""The quickstart's console: megapile's own lines by default; DeepSpeed's INFO lines, the library warnings it
filters and wandb's summary only with --verbose (which the script passes on to train.py as well)."""
import os
import shutil
import subprocess

import pytest
from train_helpers import ROOT


def _quickstart(work, *extra):
    env = dict(os.environ, WANDB_MODE="offline")
    env.pop("WANDB_SILENT", None)  # CI sets it; a user does not
    return subprocess.run(["bash", os.path.join(ROOT, "launch", "quickstart.sh"), str(work), "train.max_steps=4",
                           "train.log_every=1", "train.eval_every=2", "checkpoint.every=2", "logging.wandb=true",
                           *extra], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow
def test_quickstart_is_quiet_by_default_and_verbose_on_request(tmp_path, preprocessed, tokenizer_path):
    work = tmp_path / "quickstart"
    (work / "data" / "sample").mkdir(parents=True)  # the quickstart's data, made by the fixtures instead
    shutil.copy(tokenizer_path, work / "data" / "tokenizer.json")
    for split, name in (("train", "pile_train"), ("valid", "pile_val")):
        for ext in (".bin", ".idx"):
            shutil.copy(preprocessed[split] + ext, work / "data" / (name + ext))

    quiet = _quickstart(work)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    out = quiet.stdout + quiet.stderr
    lines = [line for line in out.splitlines() if line.strip()]
    assert sum(line.startswith("step ") for line in lines) == 4
    for noise in ("[INFO]", "FutureWarning", "Run summary", "Run history", "built successfully",
                  "Setting accelerator to CPU"):
        assert noise not in out, f"{noise!r} reached the console:\n{out[-3000:]}"
    assert len(lines) <= 15, out

    shutil.rmtree(work / "runs")
    verbose = _quickstart(work, "--verbose")
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    out = verbose.stdout + verbose.stderr
    for shown in ("[INFO]", "FutureWarning", "Run summary", "built successfully"):
        assert shown in out, f"--verbose did not show {shown!r}:\n{out[-3000:]}"


def _on_a_terminal(cmd, env, timeout=600.0):
    """Run `cmd` with stdout and stderr on a pseudo-terminal, as a user at a shell would; return (code, text)."""
    import fcntl
    import pty
    import select
    import struct
    import termios
    import time

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 40 rows × 120 columns
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, cwd=ROOT, env=env)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if not ready:
            if proc.poll() is not None:
                break
            continue
        try:
            data = os.read(master, 1 << 16)
        except OSError:  # EIO: the process closed its end
            break
        if not data:
            break
        chunks.append(data)
    proc.kill() if proc.poll() is None else None
    os.close(master)
    return proc.wait(), b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_progress_bars_on_a_terminal_and_off_with_no_progress(tmp_path, preprocessed, tokenizer_path):
    """On a terminal: the step bar, validation and the checkpoint's seal (shown at once here: the delay that
    keeps quick work bar-free is set to 0); --no-progress: none; not a terminal: none (logs stay clean)."""
    import sys

    from train_helpers import DS, TRAIN, small_run_overrides

    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", MEGAPILE_PROGRESS_DELAY="0")

    def cmd(name, *flags):
        return [sys.executable, TRAIN, "--deepspeed_config", os.path.join(DS, "zero0.json"), *flags] + \
            small_run_overrides(preprocessed, tokenizer_path, str(tmp_path / name), train__max_steps=2,
                                checkpoint__every=2)

    bars = ("train:", "validation:", "seal checkpoint:")
    code, shown = _on_a_terminal(cmd("tty"), env)
    assert code == 0, shown[-3000:]
    assert all(b in shown for b in bars), shown[-3000:]
    code, hidden = _on_a_terminal(cmd("tty_off", "--no-progress"), env)
    assert code == 0 and not any(b in hidden for b in bars), hidden[-3000:]
    piped = subprocess.run(cmd("piped"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert piped.returncode == 0 and not any(b in piped.stdout + piped.stderr for b in bars)
