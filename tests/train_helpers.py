"""megapile/train.py in tests: a small run's overrides, launched the way users do (through the harness), and its
metrics read back."""
from __future__ import annotations

import json
import os
import subprocess

from harness import ROOT, run_ranks

TRAIN = os.path.join(ROOT, "megapile", "train.py")
DS = os.path.join(ROOT, "ds_configs")


def small_run_overrides(preprocessed: dict, tokenizer_path: str, run_dir: str, **extra) -> list[str]:
    """A 2-layer model on the test corpus, one log line per step, no wandb."""
    values = {
        "data.train": preprocessed["train"],
        "data.valid": preprocessed["valid"],
        "data.tokenizer": tokenizer_path,
        "model.num_layers": 2,
        "model.hidden_size": 64,
        "model.num_heads": 4,
        "model.max_seq_len": 64,
        "train.seq_len": 32,
        "train.micro_batch_size": 2,
        "train.global_batch_size": 8,
        "train.max_steps": 10,
        "train.log_every": 1,
        "train.eval_iters": 2,
        "optim.lr": 3e-3,
        "optim.warmup_steps": 2,
        # MFU against a fixed peak: measuring the CPU's matmul peak takes 0.3 s of every rank's start-up (the
        # quickstart and bench/gpu.sh tests run that measurement)
        "train.peak_tflops": 0.1,
        "logging.run_dir": run_dir,
        "logging.wandb": False,
    }
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={_yaml(v)}" for k, v in values.items()]


def launch(launcher: str, nproc: int, ds_config: str, overrides: list[str], timeout: float = 600,
           config: str | None = None) -> subprocess.CompletedProcess:
    """Run one training job to completion; fail the test with its output if it fails. The output is kept in
    RUN_DIR-logs/ beside the run directory (never inside it: tests compare run directories' contents)."""
    args = ["--deepspeed_config", os.path.join(DS, ds_config)] + (["--config", config] if config else []) + overrides
    return run_ranks(launcher, nproc, [TRAIN] + args, logs=run_dir_of(overrides) + "-logs", timeout=timeout)


def run_dir_of(overrides: list[str]) -> str:
    return next(o.split("=", 1)[1] for o in reversed(overrides) if o.startswith("logging.run_dir="))


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def losses(run_dir: str) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir)]


def assert_close(a: list[float], b: list[float], rel: float) -> None:
    assert len(a) == len(b), (a, b)
    worst = max(abs(x - y) / abs(y) for x, y in zip(a, b))
    assert worst <= rel, f"relative difference {worst:.2e} > {rel:.0e}\n{a}\n{b}"


def _yaml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
