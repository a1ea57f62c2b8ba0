"""A checkpoint works wherever it is copied: it carries its tokenizer, and the run config it records names its
data and tokenizer by absolute paths (relative ones mean the working directory at start).

Trained in one directory with relative paths, the run directory is moved elsewhere and the training directory
(tokenizer included) deleted; eval, generate, export-hf and consolidate then work from a third directory.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml
from train_helpers import DS, ROOT, TRAIN, small_run_overrides


def _megapile(args, cwd):
    return subprocess.run([sys.executable, "-m", "megapile.cli"] + args, cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT))


@pytest.mark.slow
def test_a_moved_run_evaluates_generates_and_exports_with_its_own_tokenizer(tmp_path, sample_corpus, preprocessed,
                                                                           tokenizer_path):
    trained_in, moved_to, elsewhere = tmp_path / "cluster", tmp_path / "laptop", tmp_path / "elsewhere"
    for d in (trained_in / "data", moved_to, elsewhere):
        d.mkdir(parents=True)
    for split in ("train", "valid"):
        for ext in (".bin", ".idx"):
            shutil.copy(preprocessed[split] + ext, trained_in / "data" / (split + ext))
    shutil.copy(tokenizer_path, trained_in / "data" / "tokenizer.json")
    overrides = small_run_overrides({"train": "data/train", "valid": "data/valid"}, "data/tokenizer.json",
                                    "runs/tiny", train__max_steps=2, checkpoint__every=2)
    proc = subprocess.run([sys.executable, TRAIN, "--deepspeed_config", os.path.join(DS, "zero0.json")] + overrides,
                          cwd=trained_in, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline"))
    assert proc.returncode == 0, proc.stderr[-3000:]

    run = trained_in / "runs" / "tiny"
    resolved = yaml.safe_load((run / "config.yaml").read_text())["data"]
    assert resolved["train"] == str(trained_in / "data" / "train")  # absolute, as resolved at start
    assert resolved["valid"] == str(trained_in / "data" / "valid")
    assert resolved["tokenizer"] == str(trained_in / "data" / "tokenizer.json")
    ckpt = run / "checkpoints" / "global_step2"
    carried = (ckpt / "tokenizer" / "tokenizer.json").read_bytes()
    recorded = json.loads((ckpt / "megapile_state.json").read_text())["fingerprints"]["tokenizer"]
    assert hashlib.sha256(carried).hexdigest() == recorded
    assert "tokenizer/tokenizer.json" in json.loads((ckpt / "manifest.json").read_text())["files"]

    shutil.move(str(run), moved_to / "tiny")
    shutil.rmtree(trained_in)  # the data and the tokenizer the run was trained with are gone
    checkpoints = str(moved_to / "tiny" / "checkpoints")
    val = os.path.join(sample_corpus, "val", "*.jsonl.zst")

    ok = {
        "eval": _megapile(["eval", "--checkpoint", checkpoints, "--data", val, "--max-docs", "3"], elsewhere),
        "generate": _megapile(["generate", "--checkpoint", checkpoints, "--prompt", "", "--max-new-tokens", "4",
                               "--temperature", "0"], elsewhere),
        "export-hf": _megapile(["export-hf", "--checkpoint", checkpoints, "--output", "hf"], elsewhere),
        "consolidate": _megapile(["ckpt", "consolidate", checkpoints, "--output", "weights/model.safetensors"],
                                 elsewhere),
        "info": _megapile(["ckpt", "info", checkpoints], elsewhere),
    }
    for name, result in ok.items():
        assert result.returncode == 0, f"{name}: {result.stderr[-2000:]}"
    assert "bits/byte" in ok["eval"].stdout, ok["eval"].stdout
    assert (elsewhere / "hf" / "tokenizer.json").is_file()
    assert (elsewhere / "weights" / "tokenizer.json").read_bytes() == carried
    assert f"carried (tokenizer.json), sha256 {recorded[:12]}" in ok["info"].stdout

    # --tokenizer overrides the carried one only with the same tokenizer: the same bytes elsewhere work, another
    # file (here: the same vocabulary, written differently) is a one-line error naming both fingerprints
    same, other = elsewhere / "same.json", elsewhere / "other.json"
    same.write_bytes(carried)
    other.write_text(json.dumps(json.loads(carried), indent=1))
    assert _megapile(["generate", "--checkpoint", checkpoints, "--prompt", "a", "--max-new-tokens", "2",
                      "--tokenizer", str(same)], elsewhere).returncode == 0
    bad = _megapile(["generate", "--checkpoint", checkpoints, "--prompt", "a", "--tokenizer", str(other)], elsewhere)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1, bad.stderr
    assert bad.stderr.startswith(f"megapile: error: tokenizer {other} is not the one ") and recorded[:12] in bad.stderr
