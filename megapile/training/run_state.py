"""What a training run holds once it is built (`train.build`), and where it stands."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from megapile.checkpoint.background import Background
from megapile.checkpoint.state_file import RunState
from megapile.config import Config
from megapile.data.loader import Batches
from megapile.parallel.layout import Layout
from megapile.parallel.parallelize import TrainState
from megapile.reporting.metrics import MetricsLogger
from megapile.runtime.distributed import DistEnv
from megapile.runtime.heartbeat import Heartbeat
from megapile.runtime.peers import Peers
from megapile.runtime.run_lock import RunLock
from megapile.training.spikes import PipelineJudge, SpikeDetector, merge_ranges
from megapile.training.stragglers import StragglerWatch


@dataclass
class Position:
    """Where training stands: optimizer steps done, global samples and tokens consumed. The sample index is a
    sum of the global batches trained so far, never step × global batch, so a resume with another
    `train.global_batch_size` goes on at the saved sample index."""

    step: int = 0
    sample_index: int = 0
    tokens_seen: int = 0
    skip_samples: list = field(default_factory=list)  # sorted [start, end) global sample ranges never trained

    @classmethod
    def of_state(cls, step: int, state: RunState, skip_samples: list) -> "Position":
        return cls(step, int(state.sample_index), int(state.tokens_seen), merge_ranges(state.skip_samples, skip_samples))


@dataclass
class Run:
    """Everything a training loop needs, built once."""

    cfg: Config
    env: DistEnv
    device: torch.device
    layout: Layout
    state: TrainState
    batches: Batches
    valid_batches: Optional[Batches]
    logger: MetricsLogger
    ckpt_dir: str
    accum: int
    flops_per_token: int
    peak_tflops: float
    fingerprints: dict
    components: list = field(default_factory=list)  # megapile.evaluation.component_eval.Component: per-component validation
    tokenizer_files: dict = field(default_factory=dict)  # {path in a checkpoint: bytes}: the carried tokenizer
    spikes: Optional[SpikeDetector] = None  # train.spike.enabled: the loss-spike detector (megapile/training/spikes.py)
    pipeline_judge: Optional[PipelineJudge] = None  # its judge inside a pipeline's loss function
    run_lock: Optional[RunLock] = None  # rank 0's: this run's exclusive hold on logging.run_dir
    peers: Optional[Peers] = None  # every rank's host, address and pid: who a failed collective points at
    heartbeat: Optional[Heartbeat] = None  # names a silent rank within train.heartbeat_timeout_s (world > 1)
    stragglers: Optional[StragglerWatch] = None  # names a rank whose forward passes lag (train.straggler_ratio)
    background: Optional[Background] = None  # checkpoint.async: the save being written in the background

    @property
    def engine(self) -> Any:
        return self.state.engine

    @property
    def scheduler(self) -> Any:
        return self.state.scheduler

    @property
    def param_order(self) -> list[str]:
        return self.state.param_order

    def close(self) -> None:
        for batches in [self.batches, self.valid_batches, *(c.batches for c in self.components)]:
            if batches is not None:
                batches.close()
        if self.run_lock is not None:  # last: metrics and sinks are closed by now (train.train)
            self.run_lock.release()
