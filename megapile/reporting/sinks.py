"""Where a run's numbers go, one class per destination: RUN_DIR/metrics.jsonl, the console, Weights & Biases,
TensorBoard. MetricsLogger (megapile/reporting/metrics.py) forwards each call to its sinks, in their order; a new sink
(MLflow, a CSV, a test's spy) is one more subclass of Sink.
"""
from __future__ import annotations

import abc
import json
import os
import secrets
import string
import sys
from typing import Any

from tqdm import tqdm


class Sink(abc.ABC):
    """One destination. `log` is the one method a sink must have; the others do nothing unless it needs them."""

    @abc.abstractmethod
    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """One record: the step and its numbers (a value may be None: not measured this time)."""

    def rewind(self, step: int) -> None:
        """Training (re)starts after `step` (0 on a fresh start): what was logged past it will be logged again."""

    def message(self, text: str) -> None:
        """A line for a person (resumed from, saved, a spike), not a number."""

    def close(self) -> None:
        pass


def numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """The values a charting sink can plot: numbers only, not the Nones of what was not measured."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


class MetricsFileSink(Sink):
    """RUN_DIR/metrics.jsonl: one JSON object a line, the step first."""

    def __init__(self, run_dir: str):
        os.makedirs(run_dir, exist_ok=True)
        self._path = os.path.join(run_dir, "metrics.jsonl")
        self._file = open(self._path, "a", buffering=1)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")

    def rewind(self, step: int) -> None:
        """Drop records past the checkpoint's step (they will be recomputed) and any line cut short by a kill, so
        metrics.jsonl reads as one uninterrupted run."""
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

    def close(self) -> None:
        self._file.close()


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


def console_line(step: int, metrics: dict[str, Any]) -> str:
    record = {"step": step, **metrics}
    return " | ".join(fmt(record[key]) if callable(fmt) else fmt.format(record[key])
                      for key, fmt in _CONSOLE if record.get(key) is not None)


class ConsoleSink(Sink):
    """Standard output: a short line per record, and the messages."""

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        # tqdm.write lifts any progress bar on the terminal, prints, and redraws it (every bar's .write is this
        # class method); with no bar it is a plain write to stdout
        tqdm.write(console_line(step, metrics))

    def message(self, text: str) -> None:
        print(text, file=sys.stdout, flush=True)


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


class WandbSink(Sink):
    """Weights & Biases, in RUN_DIR/wandb: one wandb run per run directory however often it restarts (its id is
    kept in RUN_DIR/wandb_run_id and resumed); wandb itself replaces a step logged again."""

    def __init__(self, run_dir: str, project: str, run_config: dict[str, Any], verbose: bool):
        import wandb  # lazy: +0.4 s on top of everything else a run imports; only logging.wandb needs it

        self._run = wandb.init(
            project=project,
            dir=run_dir,
            config=run_config,
            mode=wandb_mode(dict(os.environ)),
            name=os.path.basename(os.path.abspath(run_dir)),
            id=wandb_run_id(run_dir),
            resume="allow",
            settings=wandb.Settings(quiet=not verbose),  # quiet: no run summary at the end
        )

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self._run.log(numbers(metrics), step=step)

    def close(self) -> None:
        self._run.finish()


class TensorBoardSink(Sink):
    """RUN_DIR/tensorboard: one stream per run directory, whose steps past a resumed checkpoint are purged, so its
    curves show each step once, from the branch that stands."""

    def __init__(self, run_dir: str):
        self._dir = os.path.join(run_dir, "tensorboard")
        self._writer = None  # opened by rewind: purging needs the step training starts from

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if self._writer is not None:
            for key, value in numbers(metrics).items():
                self._writer.add_scalar(key, value, step)

    def rewind(self, step: int) -> None:
        # lazy: needs the optional tensorboard package (a test extra), +0.15 s; only logging.tensorboard uses it
        from torch.utils.tensorboard import SummaryWriter

        self.close()  # a rollback: the branch given up is flushed to its own file before the purge
        # TensorBoard hides the earlier starts' events from step+1 on: they are logged again from here
        self._writer = SummaryWriter(self._dir, purge_step=step + 1)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
