"""`megapile plot RUN_DIR [RUN_DIR ...]`: training/validation loss, lr and tokens/s against step, runs overlaid;
validation bits per byte per Pile component when the runs logged it."""
from __future__ import annotations

import argparse
import json
import os
import sys

from matplotlib.figure import Figure  # a Figure without pyplot: no display and no global backend to set


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {run_dir} a megapile run directory?")
    records = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:  # a run killed mid-write leaves a partial last line
                    print(f"megapile plot: skipping unreadable line {path}:{lineno}", file=sys.stderr)
    return records


def plot_runs(run_dirs: list[str], output: str) -> None:
    """Four panels (training and validation loss, lr, tokens/s), and a fifth with one line per Pile component's
    validation bits per byte when a run logged them (train.eval_components)."""
    panels = [("loss", "training loss"), ("val_loss", "validation loss"), ("lr", "learning rate"),
              ("tokens_per_s", "tokens / s")]
    runs = [(os.path.basename(os.path.normpath(d)), read_metrics(d)) for d in run_dirs]
    components = sorted({k for _, records in runs for r in records for k in r if k.startswith("val_bpb/")})
    fig = Figure(figsize=(11, 10.5 if components else 7))
    axes = fig.subplots(3 if components else 2, 2)
    flat = list(axes.flat)
    for label, records in runs:
        for ax, (key, _) in zip(flat, panels):
            _line(ax, records, key, label)
        for key in components:
            _line(flat[4], records, key, key.split("/", 1)[1] + ("" if len(runs) == 1 else f" ({label})"))
    for ax, (_, title) in zip(flat, panels + [("", "validation bits per byte, by component")]):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    if components:
        flat[5].axis("off")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=100)


def _line(ax, records: list[dict], key: str, label: str) -> None:
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    if points:
        steps, values = zip(*points)
        ax.plot(steps, values, marker="." if len(points) < 30 else None, label=label)


def add_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--output", "-o", default="loss.png", help="PNG to write (default loss.png)")


def cli_main(args: argparse.Namespace) -> int:
    try:
        plot_runs(args.run_dirs, args.output)
    except FileNotFoundError as e:
        print(f"megapile: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}")
    return 0
