"""Where training numbers go: console lines, RUN_DIR/metrics.jsonl, Weights & Biases, TensorBoard.

Only rank 0 makes a MetricsLogger that writes; other ranks get one with every sink off.
"""
from __future__ import annotations

import json
import os
import secrets
import string
import sys
from typing import Any

from megapile.config import LoggingConfig

# The console line shows these, in this order, when present (a format string or a function of the value).
_CONSOLE = [
    ("step", "step {}"),
    ("loss", "loss {:.4f}"),
    ("val_loss", "val {:.4f}"),
    ("lr", "lr {:.3e}"),
    ("grad_norm", "gnorm {:.3f}"),
    ("tokens_per_s", "{:,.0f} tok/s"),
    ("tflops_per_device", "{:.2f} TFLOP/s/dev"),
    ("mfu", "MFU {:.1%}"),
    ("elapsed_seconds", lambda s: f"{hms(s)} elapsed"),
    ("eta_seconds", lambda s: f"ETA {hms(s)}"),
]


def hms(seconds: float) -> str:
    """1h02m03s, 4m05s, 6s."""
    s = int(round(seconds))
    h, m = s // 3600, s // 60 % 60
    return f"{h}h{m:02d}m{s % 60:02d}s" if h else f"{m}m{s % 60:02d}s" if m else f"{s}s"


def wandb_run_id(run_dir: str) -> str:
    """The run directory's wandb run id: made at its first start, read back at every later one."""
    path = os.path.join(run_dir, "wandb_run_id")
    if os.path.exists(path):
        with open(path) as f:
            return f.read().strip()
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # wandb's id format
    with open(path + ".tmp", "w") as f:
        f.write(run_id + "\n")
    os.replace(path + ".tmp", path)
    return run_id


def wandb_mode(environ: dict[str, str]) -> str:
    """Online only when the user configured a key or a mode; never ask for a login."""
    if environ.get("WANDB_MODE"):
        return environ["WANDB_MODE"]
    return "online" if environ.get("WANDB_API_KEY") else "offline"


class MetricsLogger:
    """One training run's sinks. A restarted run (a crash, a requeue, a rollback) continues the same ones: the
    same wandb run (its id is kept in RUN_DIR/wandb_run_id), and a TensorBoard stream whose steps past the
    resumed checkpoint are purged (`rewind`), so every sink reads as one run with each step once."""

    def __init__(self, cfg: LoggingConfig, run_config: dict[str, Any], enabled: bool):
        self.enabled = enabled
        self._cfg = cfg
        self._wandb = None
        self._tb = None
        self._file = None
        if not enabled:
            return
        os.makedirs(cfg.run_dir, exist_ok=True)
        self._path = os.path.join(cfg.run_dir, "metrics.jsonl")
        self._file = open(self._path, "a", buffering=1)
        if cfg.wandb:
            import wandb  # lazy: +0.4 s on top of everything else a run imports; only logging.wandb needs it

            self._wandb = wandb.init(
                project=cfg.wandb_project,
                dir=cfg.run_dir,
                config=run_config,
                mode=wandb_mode(dict(os.environ)),
                name=os.path.basename(os.path.abspath(cfg.run_dir)),
                id=wandb_run_id(cfg.run_dir),
                resume="allow",
                settings=wandb.Settings(quiet=not cfg.verbose),  # quiet: no run summary at the end
            )

    def log(self, record: dict[str, Any], console=None) -> None:
        """Write one step's numbers to every sink; `console` prints the line (e.g. tqdm.write)."""
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        line = " | ".join(fmt(record[key]) if callable(fmt) else fmt.format(record[key])
                          for key, fmt in _CONSOLE if record.get(key) is not None)
        (console or print)(line)
        step = record["step"]
        numbers = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)
        if self._tb is not None:
            for key, value in numbers.items():
                self._tb.add_scalar(key, value, step)

    def rewind(self, step: int) -> None:
        """On resume: drop records past the checkpoint's step (they will be recomputed) and any line
        cut short by a kill, so metrics.jsonl reads as one uninterrupted run."""
        if not self.enabled:
            return
        self._file.close()
        kept = []
        with open(self._path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record.get("step", 0) <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
        tmp = self._path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self._path)
        self._file = open(self._path, "a", buffering=1)
        if self._cfg.tensorboard:
            # lazy: needs the optional tensorboard package (a test extra), +0.15 s; only logging.tensorboard uses it
            from torch.utils.tensorboard import SummaryWriter

            # TensorBoard hides the earlier starts' events from step+1 on: they are logged again from here
            self._tb = SummaryWriter(os.path.join(self._cfg.run_dir, "tensorboard"), purge_step=step + 1)

    def message(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stdout, flush=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()
