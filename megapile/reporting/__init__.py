"""What a run tells its user: metrics and their sinks (metrics.py, sinks.py: metrics.jsonl, console, wandb,
TensorBoard), console lines and progress bars (console.py, progress.py), plots of finished runs (plot.py)."""
