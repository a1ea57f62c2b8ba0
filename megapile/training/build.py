"""Build a training run from its config: check everything that can be checked before any process starts, then
start the process group and build data, model and engine (`build` -> megapile.training.run_state.Run).

The checks come first, so that a bad config, a missing file or an impossible layout is one line on stderr
within seconds, not a traceback after minutes of start-up on every rank.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import psutil
import torch
import yaml

from megapile import checkpoint
from megapile.checkpoint import background, fragments, slices
from megapile.checkpoint.rng import seed_everything
from megapile.config import Config, ConfigError, DatasetSpec
from megapile.data import DataError
from megapile.data.loader import Batches
from megapile.data.samples import build_samples
from megapile.data.tokenizer import load_tokenizer
from megapile.evaluation import component_eval
from megapile.hf.export import apply_init_from
from megapile.model import GPT, build_model, meta_gpt
from megapile.parallel.collectives import any_rank
from megapile.parallel.ds_config import precision_line, resolve_parallel
from megapile.parallel.layout import Layout, pad_vocab_for_tensor
from megapile.parallel.parallelize import TrainState, parallelize
from megapile.parallel.zero_init import build_partitioned
from megapile.reporting import console
from megapile.reporting.metrics import MetricsLogger
from megapile.runtime import distributed, heartbeat, run_lock
from megapile.runtime import peers as peers_
from megapile.training.flops import peak_tflops
from megapile.training.run_state import Run
from megapile.training.spikes import PipelineJudge, SpikeDetector
from megapile.training.stragglers import StragglerWatch


def build(cfg: Config, ds_config_path: Optional[str], env: distributed.DistEnv) -> Run:
    """Check everything that can be checked before starting processes, then start them, take the run directory
    (megapile/runtime/run_lock.py: one run per directory) and build data, model and engine. `ds_config_path`: a DeepSpeed
    JSON to read ZeRO settings from, or None (all from the YAML)."""
    console.configure(cfg.logging.verbose)
    pad_vocab_for_tensor(cfg)  # before init_from pads the HF rows to it
    init_weights = apply_init_from(cfg)  # model.init_from: shapes (and tokenizer) from a local HF directory
    device = distributed.local_device(env, os.environ)
    layout, ds_config, dtype = resolve_parallel(cfg, ds_config_path, env.world_size, device)
    accum = ds_config["gradient_accumulation_steps"]  # micro × accum × dp == global, checked in resolve_ds_config
    _absolute_data_paths(cfg)
    _check_data_paths(cfg)
    tokenizer_print, tokenizer_files = _tokenizer_facts(cfg)
    ckpt_dir = checkpoint.checkpoint_dir(cfg.checkpoint, cfg.logging.run_dir)
    checkpoint.check_writable(ckpt_dir, env.rank)  # on every rank, so no rank waits for one that gave up

    _start_processes(cfg, env, device)
    peers = _peers(env, device)
    beat = heartbeat.start(peers, env.rank, env.master_addr, env.master_port, cfg.train.heartbeat_timeout_s,
                           heartbeat.Reporter())
    lock = None
    try:
        lock = run_lock.take(cfg.logging.run_dir, env)  # before this run writes there; held until Run.close()
        seed_everything(cfg.train.seed, layout.seed_rank(env.rank))
        batches, valid_batches, components = _build_data(cfg, layout, env)
        counted = meta_gpt(cfg.model)  # counted on a model that takes no memory (ZeRO-3's own holds only partitions)
        flops_per_token = counted.flops_per_token(cfg.train.seq_len)
        n_params = counted.num_params(exclude_embedding=False)
        model = _build_model(cfg, layout, device, init_weights, ds_config)
        state = parallelize(cfg, layout, model, ds_config)

        logger = MetricsLogger.for_rank(cfg.logging, cfg.to_dict(), env.is_main)
        if env.is_main:
            _write_resolved_config(cfg, ds_config)
        peak, peak_source = peak_tflops(device, torch.float32 if dtype == "fp32" else torch.bfloat16,
                                        cfg.train.peak_tflops)
        logger.message(
            f"megapile: {n_params / 1e6:.2f}M parameters, world {env.world_size} ({env.launcher}), "
            f"ZeRO-{state.engine.zero_optimization_stage()}, {precision_line(ds_config, dtype)}, "
            f"micro {cfg.train.micro_batch_size} × accum {accum} × dp {layout.data} = global "
            f"{cfg.train.global_batch_size}, seq {cfg.train.seq_len}, {layout.describe()}; "
            f"MFU against {peak:.2f} TFLOP/s ({peak_source})"
        )
        if cfg.checkpoint.async_:
            _check_snapshot_memory(cfg, env, layout, state, peers)
        fingerprints = {"tokenizer": tokenizer_print, "train_data": batches.stream.fingerprint}
        spikes = SpikeDetector(cfg.train.spike) if cfg.train.spike.enabled else None
        return Run(cfg, env, device, layout, state, batches, valid_batches, logger, ckpt_dir, accum, flops_per_token,
                   peak, fingerprints, components, tokenizer_files, spikes,
                   _pipeline_judge(state, spikes, layout, accum) if spikes and state.pipelined else None, lock,
                   peers, beat, _stragglers(cfg, env, peers, device, state),
                   background.Background(env.world_size, state.engine.optimizer) if cfg.checkpoint.async_ else None)
    except BaseException:  # a failed start-up leaves the directory to the next run at once
        if lock is not None:
            lock.release()
        if beat is not None:
            beat.stop()
        raise


def _check_snapshot_memory(cfg: Config, env: distributed.DistEnv, layout: Layout, state: TrainState,
                           peers: peers_.Peers) -> None:
    """checkpoint.async keeps a snapshot of each rank's slices in host memory: refused in one line, on every rank
    alike, where this host's ranks would not fit it (megapile/checkpoint/background.py)."""
    held = slices.held(state.engine, layout, env.rank, cfg.model.num_layers, cfg.model.family.tensor_plan)
    elements = fragments.own_elements(slices.holder(state.engine), held, layout, env.rank)
    here = sum(p.host == peers[env.rank].host for p in peers.peers)
    why = background.refusal(elements * background.SNAPSHOT_BYTES_PER_ELEMENT, here, psutil.virtual_memory().available)
    if any_rank([why is not None], env.world_size)[0]:
        raise ConfigError(why or "checkpoint.async: another host's ranks have too little host memory for the "
                          "snapshot; set checkpoint.async=false")


def _pipeline_judge(state: TrainState, spikes: SpikeDetector, layout: Layout, accum: int) -> PipelineJudge:
    """Put the spike judge inside the pipeline's loss function (the only place a pipeline's loss is known before
    its update). The verdict is shared from the last stage's first rank: stage pp-1, data rank 0, tensor rank 0."""
    module = state.engine.module
    judge = PipelineJudge(spikes, module.loss_fn, accum, state.engine.grid.get_data_parallel_group(),
                          (layout.pipeline - 1) * layout.data * layout.tensor)
    module.loss_fn = judge
    return judge


def _start_processes(cfg: Config, env: distributed.DistEnv, device: torch.device) -> None:
    """This rank's device and threads, and the process group over all ranks."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        _set_cpu_threads(env)
    with console.library_output(cfg.logging.verbose):  # DeepSpeed's "shm comm op built" line
        distributed.init(env, backend="nccl" if device.type == "cuda" else "gloo",
                         timeout_s=cfg.train.collective_timeout_s)


def _peers(env: distributed.DistEnv, device: torch.device) -> peers_.Peers:
    """Every rank's host, address, pid and device, for naming a rank in an error (megapile/runtime/peers.py)."""
    return peers_.gather(peers_.me(env.rank, env.master_addr, env.master_port, str(device)), env.world_size)


def _stragglers(cfg: Config, env: distributed.DistEnv, peers: peers_.Peers, device: torch.device,
                state) -> Optional[StragglerWatch]:
    """The straggler watch (megapile/training/stragglers.py), for data-parallel forward passes of more than one rank."""
    if env.world_size == 1 or not cfg.train.straggler_ratio or state.pipelined:
        return None
    return StragglerWatch(peers, env.rank, cfg.train.straggler_ratio, device)


def _build_data(cfg: Config, layout: Layout, env: distributed.DistEnv):
    """(training batches, validation batches or None, per-component validation) for this rank."""
    def stream(specs):
        return build_samples([s.prefix for s in specs], [s.weight for s in specs], cfg.train.seq_len,
                             cfg.train.seed, cache_dir=cfg.data.cache_dir)

    def batches(specs):
        return Batches(stream(specs), cfg.train.global_batch_size, cfg.train.micro_batch_size,
                       layout.data_rank(env.rank), layout.data)

    valid_specs = cfg.data.valid_specs()
    components = (component_eval.components([s.prefix for s in valid_specs],
                                            lambda prefix: batches([DatasetSpec(prefix)]))
                  if cfg.train.eval_components else [])
    return batches(cfg.data.train_specs()), batches(valid_specs) if valid_specs else None, components


def _build_model(cfg: Config, layout: Layout, device: torch.device, init_weights: Optional[dict],
                 ds_config: dict) -> GPT:
    """The plain GPT, initialised; on the meta device for a pipeline, whose stages each build their own layers;
    with ZeRO-3, each rank building only its partitions (megapile/parallel/zero_init.py)."""
    if layout.pipeline > 1:
        return meta_gpt(cfg.model)
    if cfg.parallel.zero_stage == 3:
        return build_partitioned(cfg.model, cfg.train.seed, ds_config, device, init_weights)
    model = build_model(cfg.model, seed=cfg.train.seed, device=device)
    if init_weights is not None:
        model.load_state_dict(init_weights)
    return model


def _set_cpu_threads(env: distributed.DistEnv) -> None:
    """The deepspeed launcher leaves OMP_NUM_THREADS unset: split the cores between local ranks."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    local_world = next((int(os.environ[k]) for k in ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE",
                                                      "SLURM_NTASKS_PER_NODE") if os.environ.get(k, "").isdigit()),
                       env.world_size)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))


def _check_data_paths(cfg: Config) -> None:
    specs = cfg.data.train_specs()
    if not specs:
        raise ConfigError("data.train is not set: give a preprocessed prefix or a list of {prefix, weight}")
    for section, items in (("data.train", specs), ("data.valid", cfg.data.valid_specs())):
        for spec in items:
            for ext in (".bin", ".idx"):
                if not os.path.exists(spec.prefix + ext):
                    raise ConfigError(f"{section}: {spec.prefix}{ext} not found (run `megapile preprocess` first)")
            if spec.weight <= 0 or not math.isfinite(spec.weight):
                raise ConfigError(f"{section}: weight of {spec.prefix} must be a positive number, got {spec.weight}")


def _absolute_data_paths(cfg: Config) -> None:
    """Relative data, tokenizer and cache paths mean the working directory at start (as on a command line);
    they are made absolute once here, so the resolved config and every checkpoint name the same files."""
    data = cfg.data
    for specs in (data.train, data.valid):
        for spec in specs if isinstance(specs, list) else ():
            spec.prefix = os.path.abspath(spec.prefix)
    data.train, data.valid = (os.path.abspath(v) if isinstance(v, str) else v for v in (data.train, data.valid))
    data.tokenizer, data.cache_dir = (os.path.abspath(v) if v else v for v in (data.tokenizer, data.cache_dir))


def _tokenizer_facts(cfg: Config) -> tuple[str | None, dict[str, bytes]]:
    """Fill model.vocab_size from data.tokenizer when unset; return the tokenizer's fingerprint and its files'
    bytes as they go into every checkpoint (read once, so every copy has that fingerprint)."""
    if not cfg.data.tokenizer:
        if cfg.model.vocab_size is None:
            raise ConfigError("model.vocab_size is not set and neither is data.tokenizer to read it from")
        return None, {}
    try:
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        files = {}
        for path in tokenizer.files:
            with open(path, "rb") as f:
                files[f"{checkpoint.TOKENIZER_DIR}/{os.path.basename(path)}"] = f.read()
    except (DataError, OSError) as e:
        raise ConfigError(f"data.tokenizer: {e}") from None
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = tokenizer.vocab_size
    elif cfg.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size {cfg.model.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}")
    return tokenizer.fingerprint, files


def _write_resolved_config(cfg: Config, ds_config: dict) -> None:
    os.makedirs(cfg.logging.run_dir, exist_ok=True)
    with open(os.path.join(cfg.logging.run_dir, "config.yaml"), "w") as f:
        yaml.safe_dump({**cfg.to_dict(), "deepspeed": ds_config}, f, sort_keys=False)
