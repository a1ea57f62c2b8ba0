"""Run configuration: one dataclass per concern, loaded from YAML with dotted overrides.

Every key a user can write is a documented field here. Unknown keys, wrong types and bad
values raise `ConfigError` with a one-line message naming the key and the file, because a
misspelled key that is silently ignored wastes a whole training run.
"""
from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import yaml

from megapile.errors import ConfigError  # noqa: F401  (re-exported: `from megapile.config import ConfigError`)
from megapile.models import FAMILIES, Family, family


@dataclass
class RopeScalingConfig:
    """Llama-3 rotary scaling (`rope_type: llama3` in transformers): wavelengths longer than
    original_max_seq_len / low_freq_factor are stretched by `factor`, those shorter than
    original_max_seq_len / high_freq_factor are kept, and the band between is interpolated."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192  # the context length the unscaled model was trained at

    def __post_init__(self) -> None:
        for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len"):
            _check_positive(f"model.rope_scaling.{key}", getattr(self, key))
        if self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError(f"model.rope_scaling.high_freq_factor ({self.high_freq_factor}) must be > "
                              f"model.rope_scaling.low_freq_factor ({self.low_freq_factor})")


@dataclass
class ModelConfig:
    """Transformer shape. `arch` picks a model family (megapile/models/: neox, gpt2, llama, qwen2, ...), whose
    description fills the fields left None below and says which of the others it allows."""

    arch: str = "neox"  # a family in megapile/models/: "neox" (GPT-NeoX/Pythia) | "gpt2" | "llama" | ...
    num_layers: int = 2
    hidden_size: int = 64
    num_heads: int = 4
    num_kv_heads: Optional[int] = None  # key/value heads (grouped-query families); None: num_heads; 1: multi-query
    intermediate_size: Optional[int] = None  # MLP width (gated MLPs: of the gate and up projections); None: 4 * hidden
    vocab_size: Optional[int] = None  # None: taken from data.tokenizer at start-up
    pad_vocab_multiple: int = 128  # embedding rows are padded up to a multiple of this
    max_seq_len: int = 2048  # learned positions (gpt2) / rotary cache length
    # None in the five fields below: the family's default (e.g. rotary_pct 0.25 neox, 1.0 llama; rotary_base
    # 10000, 1e6 qwen2; parallel_residual only neox; tie_embeddings only gpt2; activation gelu/gelu_tanh/silu)
    rotary_pct: Optional[float] = None  # fraction of each head's dims that get rotary
    rotary_base: Optional[float] = None
    rope_scaling: Optional[RopeScalingConfig] = None  # Llama-3 style scaling of the rotary frequencies (llama)
    parallel_residual: Optional[bool] = None
    tie_embeddings: Optional[bool] = None
    activation: Optional[str] = None  # "gelu" | "gelu_tanh" | "silu"
    dropout: float = 0.0  # attention-probability and residual dropout
    norm_eps: float = 1e-5
    init_std: float = 0.02
    activation_checkpointing: bool = False  # recompute blocks in backward to save memory
    checkpoint_every: int = 1  # with activation_checkpointing: recompute every k-th block only (1: all; pipeline: all)
    chunked_loss: bool = True  # fused output projection + cross-entropy a chunk of rows at a time (no full
    #                            fp32 logits); false: F.linear + F.cross_entropy over the whole (B*T, vocab)
    compile: bool = False  # torch.compile each block at start-up (CPU and GPU); docs/performance.md has the figures
    attention: str = "sdpa"  # "sdpa" (torch fused/flash kernels) | "flash_attn" (the flash-attn package)
    init_from: Optional[str] = None  # a local Hugging Face model directory to start from

    def __post_init__(self) -> None:
        fam = family(self.arch)
        if isinstance(self.rope_scaling, dict):  # from a checkpoint's saved config (dataclasses.asdict)
            self.rope_scaling = RopeScalingConfig(**self.rope_scaling)
        for key, value in fam.defaults.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        _check_choice("model.activation", self.activation, ("gelu", "gelu_tanh", "silu"))
        _check_choice("model.attention", self.attention, ("sdpa", "flash_attn"))
        for key in ("num_layers", "hidden_size", "num_heads", "max_seq_len", "pad_vocab_multiple", "checkpoint_every"):
            _check_positive(f"model.{key}", getattr(self, key))
        if self.num_kv_heads is not None:  # left None when unset, so checkpoints of older runs compare equal
            _check_positive("model.num_kv_heads", self.num_kv_heads)
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads ({self.num_heads})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.rotary_pct <= 1.0:
            raise ConfigError(f"model.rotary_pct must be in [0, 1], got {self.rotary_pct}")
        self._check_family_keys(fam)

    def _check_family_keys(self, fam: Family) -> None:
        """Grouped-query attention, rope scaling and full rotary are allowed by some families only."""
        def allowing(flag: str) -> str:
            return ", ".join(f.name for f in FAMILIES.values() if getattr(f, flag))

        if self.kv_heads != self.num_heads and not fam.grouped_query:
            raise ConfigError(f"model.num_kv_heads ({self.num_kv_heads}) differs from model.num_heads "
                              f"({self.num_heads}), which only model.arch {allowing('grouped_query')} supports")
        if self.num_heads % self.kv_heads:
            raise ConfigError(f"model.num_heads ({self.num_heads}) must be divisible by model.num_kv_heads "
                              f"({self.num_kv_heads}): each key/value head serves a whole group of query heads")
        if self.rope_scaling is not None and not fam.rope_scaling:
            raise ConfigError(f"model.rope_scaling is supported with model.arch {allowing('rope_scaling')} only, "
                              f"got {self.arch!r}")
        if fam.full_rotary and self.rotary_pct != 1.0:
            raise ConfigError(f"model.rotary_pct must be 1.0 with model.arch {self.arch} (full rotary), "
                              f"got {self.rotary_pct}")
        if fam.positions == "rotary" and self.rotary_dims % 2:
            raise ConfigError(f"model.rotary_pct gives {self.rotary_dims} rotary dims per head "
                              f"(model.hidden_size / model.num_heads = {self.head_dim}); it must be even")

    @property
    def family(self) -> Family:
        """This model's family description (megapile/models/)."""
        return family(self.arch)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads: num_kv_heads, or num_heads when unset (multi-head attention)."""
        return self.num_kv_heads or self.num_heads

    @property
    def kv_groups(self) -> int:
        """Query heads per key/value head (1: multi-head attention)."""
        return self.num_heads // self.kv_heads

    @property
    def qkv_size(self) -> int:
        """Output rows of the fused QKV projection: the query heads plus a key and a value head per group."""
        return (self.num_heads + 2 * self.kv_heads) * self.head_dim


    @property
    def rotary_dims(self) -> int:
        return int(self.head_dim * self.rotary_pct)

    @property
    def ffn_size(self) -> int:
        return self.intermediate_size or 4 * self.hidden_size

    @property
    def padded_vocab_size(self) -> int:
        if self.vocab_size is None:
            raise ConfigError("model.vocab_size is unknown: set it or set data.tokenizer")
        m = self.pad_vocab_multiple
        return (self.vocab_size + m - 1) // m * m


@dataclass
class DatasetSpec:
    prefix: str  # path of a preprocessed dataset without .bin/.idx
    weight: float = 1.0


@dataclass
class DataConfig:
    train: Union[str, list[DatasetSpec], None] = None  # one prefix, or a list of {prefix, weight}
    valid: Union[str, list[DatasetSpec], None] = None  # held-out data for validation loss
    tokenizer: Optional[str] = None  # tokenizer.json (or HF directory) the data was made with
    cache_dir: Optional[str] = None  # where sample indices are cached; None: beside the data

    def train_specs(self) -> list[DatasetSpec]:
        return _as_specs(self.train)

    def valid_specs(self) -> list[DatasetSpec]:
        return _as_specs(self.valid)


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 0
    decay_steps: Optional[int] = None  # None: train.max_steps
    schedule: str = "cosine"  # "cosine" | "linear" | "constant"
    weight_decay: float = 0.1  # not applied to norms and biases
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    fused: bool = True  # torch's fused AdamW kernel (CPU and GPU); false: the per-tensor loop

    def __post_init__(self) -> None:
        _check_choice("optim.schedule", self.schedule, ("cosine", "linear", "constant"))
        _check_positive("optim.lr", self.lr)
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass
class SpikeConfig:
    """Loss-spike handling (megapile/training/spikes.py): a step whose loss is more than `z_threshold` standard deviations
    above the last `window` accepted steps is skipped; too many of them roll the run back and step over their data."""

    enabled: bool = False
    window: int = 128  # accepted steps the mean and standard deviation are taken over
    min_steps: int = 16  # no verdict before the window holds this many steps
    z_threshold: float = 6.0  # how many standard deviations above the window's mean is a spike
    max_skips: int = 3  # this many spikes within `window` steps roll the run back ...
    patience: int = 2  # ... and so do this many consecutive ones
    rollback_steps: int = 100  # roll back to the newest checkpoint at least this many steps before the first spike
    max_rollbacks: int = 3  # then stop with a one-line error

    def __post_init__(self) -> None:
        for key in ("window", "min_steps", "z_threshold", "max_skips", "patience", "rollback_steps", "max_rollbacks"):
            _check_positive(f"train.spike.{key}", getattr(self, key))
        if self.min_steps > self.window:
            raise ConfigError(f"train.spike.min_steps ({self.min_steps}) must be <= train.spike.window ({self.window})")


@dataclass
class TrainConfig:
    max_steps: int = 100
    seq_len: int = 128
    micro_batch_size: int = 4  # per data-parallel rank, per forward pass
    global_batch_size: int = 8  # samples per optimizer step, over all ranks and accumulation
    seed: int = 1234
    log_every: int = 10
    eval_every: int = 0  # 0: validate only at the end (when data.valid is set)
    eval_iters: int = 4  # validation batches per evaluation
    eval_components: bool = False  # also score each data.valid dataset apart: val_loss/<component>, val_bpb/<component>
    dtype: str = "auto"  # "auto" (fp32 on CPU; bf16 on GPUs of compute capability >= 8.0, else fp16) | "fp32" | "bf16" | "fp16"
    # What bf16/fp16 micro-batch gradients are summed (and reduced) in: "auto" fp32 wherever DeepSpeed offers it
    # (ZeRO >= 1), else the training dtype (said at start-up); "fp32" (refused where DeepSpeed lacks it) | "bf16" | "fp16"
    grad_accum_dtype: str = "auto"
    peak_tflops: Optional[float] = None  # per-device peak for MFU; None: GPU table or measured CPU matmul
    max_bad_steps: int = 5  # stop after this many consecutive steps with a non-finite loss or gradient
    collective_timeout_s: float = 600.0  # a rank that waits longer than this for the others fails the job
    # A rank whose heartbeat (outside the training collectives) stops this long is named and every rank stops:
    # a dead host or a lost network is found in about this time, not after collective_timeout_s
    heartbeat_timeout_s: float = 60.0
    # A rank whose forward passes take more than this many times the median rank's over a log window is named in the
    # log (megapile/training/stragglers.py); 0: not measured
    straggler_ratio: float = 1.5
    spike: SpikeConfig = field(default_factory=SpikeConfig)
    # Global sample ranges [start, end) never trained: a step whose batch would overlap one starts after it instead.
    # A rollback adds its range to the run's list by itself (checkpoint state); this gives more from the start.
    skip_samples: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for key in ("max_steps", "seq_len", "micro_batch_size", "global_batch_size", "log_every", "eval_iters",
                    "max_bad_steps", "collective_timeout_s", "heartbeat_timeout_s"):
            _check_positive(f"train.{key}", getattr(self, key))
        if self.straggler_ratio != 0 and not self.straggler_ratio > 1:
            raise ConfigError(f"train.straggler_ratio must be > 1 (or 0: off), got {self.straggler_ratio}")
        _check_choice("train.dtype", self.dtype, ("auto", "fp32", "bf16", "fp16"))
        _check_choice("train.grad_accum_dtype", self.grad_accum_dtype, ("auto", "fp32", "bf16", "fp16"))
        for pair in self.skip_samples:
            if len(pair) != 2 or not 0 <= pair[0] < pair[1]:
                raise ConfigError(f"train.skip_samples must hold [start, end) pairs with 0 <= start < end, got {pair}")


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None  # None: RUN_DIR/checkpoints
    every: int = 0  # save every N steps (0: only at the end)
    resume: str = "auto"  # "auto": newest good checkpoint in dir if any | "none" | a checkpoint path
    keep_last: int = 3  # keep the newest N checkpoints ...
    keep_every: int = 0  # ... plus every checkpoint whose step is a multiple of this (0: none)
    verify: str = "checksum"  # before resuming: "checksum" every file, or only "size"
    allow_data_change: bool = False  # resume onto different data/weights at the same sample index
    on_save_error: str = "continue"  # a failed periodic save (disk full): "continue" training, or "stop"
    # checkpoint.async (a Python keyword, hence the field's name): periodic saves snapshot the slices into host
    # memory and are written in the background (megapile/checkpoint/background.py)
    async_: bool = field(default=False, metadata={"key": "async"})

    def __post_init__(self) -> None:
        _check_positive("checkpoint.keep_last", self.keep_last)
        _check_choice("checkpoint.verify", self.verify, ("checksum", "size"))
        _check_choice("checkpoint.on_save_error", self.on_save_error, ("continue", "stop"))
        if self.every < 0 or self.keep_every < 0:
            raise ConfigError("checkpoint.every and checkpoint.keep_every must be >= 0")


@dataclass
class LoggingConfig:
    run_dir: str = "runs/default"
    wandb: bool = True  # offline when no API key is configured
    wandb_project: str = "megapile"
    tensorboard: bool = False
    verbose: bool = False  # DeepSpeed's INFO lines, known-harmless library warnings, wandb's summary (or --verbose)
    progress: bool = True  # progress bars on a terminal (steps, validation, resharding, saving); --no-progress


OFFLOAD_DEVICES = ("none", "cpu", "nvme")


@dataclass
class ParallelConfig:
    """How the model is spread over ranks: tensor × pipeline × data (data = world / (tensor × pipeline), checked in
    megapile/parallel/layout.py) and ZeRO's partitioning and offload within data parallelism."""

    tensor: int = 1  # tensor-parallel ranks per layer (Megatron-style attention/MLP split, DeepSpeed AutoTP)
    pipeline: int = 1  # pipeline stages (DeepSpeed PipelineModule, 1F1B schedule)
    pipeline_partition: str = "parameters"  # how blocks go to stages: "parameters" | "uniform"
    pipeline_layers: Optional[list[int]] = None  # an explicit split: transformer blocks per stage, e.g. [3, 3, 2, 2]
    # ZeRO data parallelism. Unset (null): the --deepspeed_config JSON's value if it sets one, else the default in
    # brackets; a JSON value that differs from one set here is an error (megapile/parallel/ds_config.py).
    zero_stage: Optional[int] = None  # 0 | 1 | 2 | 3 [0]
    offload_optimizer: Optional[str] = None  # "none" | "cpu" | "nvme" (ZeRO >= 1; nvme needs nvme_path in the JSON) [none]
    offload_params: Optional[str] = None  # "none" | "cpu" | "nvme" (ZeRO-3 only) [none]
    overlap_comm: Optional[bool] = None  # overlap gradient reduction with backward [DeepSpeed's default]
    reduce_bucket_size: Optional[int] = None  # elements per gradient reduction bucket [DeepSpeed's default]
    allgather_bucket_size: Optional[int] = None  # elements per parameter all-gather bucket, ZeRO-1/2 [DeepSpeed's]

    def __post_init__(self) -> None:
        _check_positive("parallel.tensor", self.tensor)
        _check_positive("parallel.pipeline", self.pipeline)
        _check_choice("parallel.pipeline_partition", self.pipeline_partition, ("parameters", "uniform"))
        if self.zero_stage is not None and self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"parallel.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        for key in ("offload_optimizer", "offload_params"):
            if getattr(self, key) is not None:
                _check_choice(f"parallel.{key}", getattr(self, key), OFFLOAD_DEVICES)
        for key in ("reduce_bucket_size", "allgather_bucket_size"):
            if getattr(self, key) is not None:
                _check_positive(f"parallel.{key}", getattr(self, key))


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def to_dict(self) -> dict[str, Any]:
        return _keyed(self)


def _key(f: dataclasses.Field) -> str:
    """A field's key in YAML: its name, or the keyword it stands for (`async_` is `async`)."""
    return f.metadata.get("key", f.name)


def _keyed(obj: Any) -> Any:
    """dataclasses.asdict, with every field under its YAML key."""
    if dataclasses.is_dataclass(obj):
        return {_key(f): _keyed(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [_keyed(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _keyed(v) for k, v in obj.items()}
    return obj


def grad_accum_steps(train: TrainConfig, dp_size: int) -> int:
    """The one place batch arithmetic is checked: micro × accum × dp == global."""
    per_step = train.micro_batch_size * dp_size
    if train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size ({train.global_batch_size}) must be a multiple of "
            f"train.micro_batch_size ({train.micro_batch_size}) × data-parallel size ({dp_size})"
        )
    return train.global_batch_size // per_step


def load_config(path: Optional[str], overrides: list[str] = ()) -> Config:
    """Read a YAML file (or nothing), apply `a.b=value` overrides, and build a checked Config."""
    raw: dict[str, Any] = {}
    if path is not None:
        if not os.path.exists(path):
            raise ConfigError(f"{path}: config file not found")
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    overridden = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = yaml.safe_load(value) if value else None
        overridden[key] = item
    return _build(Config, raw, "", _Origins(path or "<defaults>", overridden))


@dataclass(frozen=True)
class _Origins:
    """Where each value came from, so an error names the file or the command-line override that set it."""

    file: str
    overrides: dict[str, str]  # dotted key -> the override as typed

    def of(self, key: str) -> str:
        key = re.sub(r"\[\d+\].*", "", key)  # data.train[0].weight: set as part of data.train
        parent = key
        while parent:
            if parent in self.overrides:
                return f"command line '{self.overrides[parent]}'"
            parent = parent.rpartition(".")[0]
        children = [item for k, item in self.overrides.items() if k.startswith(key + ".")]
        return f"command line '{children[0]}'" if children else self.file

    def naming(self, message: str) -> str:
        """The origin of a dataclass's own check, whose message starts with the key it rejects."""
        key = message.split(" ", 1)[0]
        return self.of(key) if "." in key else self.file


def _build(cls: type, raw: Any, prefix: str, origins: _Origins) -> Any:
    where = prefix.rstrip(".") or "top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"{origins.of(where)}: {where} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {_key(f): f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise ConfigError(f"{origins.of(prefix + key)}: unknown key '{prefix}{key}' "
                              f"(known: {', '.join(sorted(names))})")
    kwargs = {names[key]: _coerce(hints[names[key]], value, f"{prefix}{key}", origins) for key, value in raw.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{origins.naming(str(e))}: {e}") from None
    except TypeError as e:  # a required field left out
        raise ConfigError(f"{origins.file}: {where}: {e}") from None


def _coerce(hint: Any, value: Any, key: str, origins: _Origins) -> Any:
    origin = typing.get_origin(hint)
    source = origins.of(key)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        # Pick the option whose shape matches the value, so its error (not a vague one) is shown.
        matching = [o for o in options if o is not type(None) and _same_kind(o, value)]
        if len(matching) == 1:
            return _coerce(matching[0], value, key, origins)
        names = " or ".join(getattr(o, "__name__", str(o)) for o in options if o is not type(None))
        raise ConfigError(f"{source}: {key} must be {names}, got {type(value).__name__} {value!r}")
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key} must be a list, got {type(value).__name__}")
        return [_coerce(item, v, f"{key}[{i}]", origins) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{key}.", origins)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool):
        if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
            return value
        raise ConfigError(f"{source}: {key} must be {hint.__name__}, got {type(value).__name__} {value!r}")
    raise ConfigError(f"{source}: {key}: unsupported type {hint}")  # a bug in this file, not user input


def _same_kind(hint: Any, value: Any) -> bool:
    if typing.get_origin(hint) is list:
        return isinstance(value, list)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, dict)
    if hint is float:
        return isinstance(value, (int, float, str)) and not isinstance(value, bool)
    return isinstance(value, hint)


def _as_specs(value: Union[str, list[DatasetSpec], None]) -> list[DatasetSpec]:
    if value is None:
        return []
    if isinstance(value, str):
        return [DatasetSpec(prefix=value)]
    return list(value)


def _check_positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{key} must be > 0, got {value}")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {value!r}")
