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
