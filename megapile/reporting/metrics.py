"""Where training numbers go: MetricsLogger hands each record, each rewind and each message to its sinks
(megapile/reporting/sinks.py), the ones `logging` turns on.

Only rank 0 has sinks; every other rank's MetricsLogger has none, so its calls do nothing.
"""
from __future__ import annotations

from typing import Any

from megapile.config import LoggingConfig
from megapile.reporting.sinks import ConsoleSink, MetricsFileSink, Sink, TensorBoardSink, WandbSink


def sinks_from_config(cfg: LoggingConfig, run_config: dict[str, Any]) -> list[Sink]:
    """metrics.jsonl and the console always; wandb and TensorBoard when configured."""
    sinks: list[Sink] = [MetricsFileSink(cfg.run_dir), ConsoleSink()]
    if cfg.wandb:
        sinks.append(WandbSink(cfg.run_dir, cfg.wandb_project, run_config, cfg.verbose))
    if cfg.tensorboard:
        sinks.append(TensorBoardSink(cfg.run_dir))
    return sinks


class MetricsLogger:
    """One training run's sinks. A restarted run (a crash, a requeue, a rollback) calls `rewind` with the step it
    starts from, and each sink continues as one run with each step once: metrics.jsonl drops the records past it,
    TensorBoard purges them, wandb resumes the same run."""

    def __init__(self, sinks: list[Sink]):
        self.sinks = list(sinks)

    @classmethod
    def for_rank(cls, cfg: LoggingConfig, run_config: dict[str, Any], is_main: bool) -> MetricsLogger:
        return cls(sinks_from_config(cfg, run_config) if is_main else [])

    def log(self, record: dict[str, Any]) -> None:
        """One record (its "step" and its numbers) to every sink."""
        metrics = {k: v for k, v in record.items() if k != "step"}
        for sink in self.sinks:
            sink.log(record["step"], metrics)

    def rewind(self, step: int) -> None:
        """Training starts after `step` (a resume, a rollback, or 0 on a fresh start)."""
        for sink in self.sinks:
            sink.rewind(step)

    def message(self, text: str) -> None:
        for sink in self.sinks:
            sink.message(text)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
