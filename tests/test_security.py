"""Security hygiene: no secret reaches the console or the run directory; our own state is JSON; every shell
script passes shellcheck (quoted paths and hostnames)."""
import glob
import json
import os
import shutil
import subprocess

import pytest
from train_helpers import ROOT, launch, small_run_overrides

SECRET = "megapile0secret0do0not0print0abcdef012345"  # 40 characters, like a W&B key


@pytest.mark.slow
def test_api_key_is_never_printed_or_written(tmp_path, preprocessed, tokenizer_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.setenv("WANDB_MODE", "offline")  # a key is set, but nothing may go online from a test
    run_dir = str(tmp_path / "run")
    proc = launch("python", 1, "zero0.json", small_run_overrides(
        preprocessed, tokenizer_path, run_dir, logging__wandb=True, train__max_steps=3))
    assert SECRET not in proc.stdout + proc.stderr
    assert os.path.isdir(os.path.join(run_dir, "wandb")), "the offline W&B run lives in the run directory"
    for path in glob.glob(os.path.join(run_dir, "**", "*"), recursive=True):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                assert SECRET.encode() not in f.read(), f"{path} contains the API key"
    state = glob.glob(os.path.join(run_dir, "checkpoints", "global_step3", "megapile_state.json"))[0]
    with open(state) as f:
        json.load(f)  # plain JSON: resuming never unpickles megapile's own state


def test_shell_scripts_pass_shellcheck():
    scripts = sorted(glob.glob(os.path.join(ROOT, "launch", "*.sh")) + glob.glob(os.path.join(ROOT, "slurm", "*.sh"))
                     + [os.path.join(ROOT, ".ci", "run")])
    assert shutil.which("shellcheck"), "shellcheck is missing: .ci/run installs it (apt-get install shellcheck)"
    proc = subprocess.run(["shellcheck", "-S", "warning", "-s", "bash"] + scripts, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
