"""Train a GPT on preprocessed Pile data with DeepSpeed.

    deepspeed megapile/train.py --deepspeed_config ds_configs/zero2.json --config configs/tiny.yaml
    torchrun --nproc_per_node 2 megapile/train.py --deepspeed_config ds_configs/zero1.json --config configs/tiny.yaml
    python megapile/train.py --config configs/tiny.yaml train.max_steps=50 optim.lr=3e-4

The position in training is one integer, the global sample index, saved with every checkpoint: at
every step each data-parallel rank reads its own slice of the same global batch, so any world size sees
the same samples in the same order. It is a sum of the global batches trained so far, never
step × global batch: a resume with another `train.global_batch_size` (batch ramp-up) goes on at the
saved sample index.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:
    # Run as a file: the script's folder (megapile/) must not shadow stdlib or library modules,
    # and the repository root must be importable even without `pip install`.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import math
import random
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import yaml

from megapile import checkpoint, component_eval, console, distributed, progress
from megapile.checkpoint import compat
from megapile.config import Config, ConfigError, grad_accum_steps, load_config
from megapile.process_exit import exit_now
from megapile.signals import EXIT_CHECKPOINTED, StopFlag
from megapile.parallel import zero

DEFAULT_DS_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ds_configs", "zero0.json")


@dataclass
class Batches:
    """This rank's share of each global batch: micro-batch j of the global batch that starts at sample `first`
    is rows [first + j*m*dp + r*m, +m)."""

    stream: object  # megapile.data.samples stream: get_batch(start, count) -> (count, seq_len + 1)
    global_batch: int
    micro_batch: int
    dp_rank: int
    dp_size: int

    def micro_batches(self, first: int, device: torch.device):
        per_micro = self.micro_batch * self.dp_size
        for j in range(self.global_batch // per_micro):
            start = first + j * per_micro + self.dp_rank * self.micro_batch
            rows = torch.from_numpy(self.stream.get_batch(start, self.micro_batch))
            if device.type == "cuda":  # pinned: the copies run asynchronously, off the host's critical path
                rows = rows.pin_memory()
            yield rows[:, :-1].to(device, non_blocking=True), rows[:, 1:].to(device, non_blocking=True)


def add_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML run config (configs/*.yaml); defaults apply without it")
    parser.add_argument("--deepspeed_config", "--deepspeed-config", default=None,
                        help=f"DeepSpeed JSON with the ZeRO settings (default {os.path.relpath(DEFAULT_DS_CONFIG)})")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; LOCAL_RANK in the environment wins")
    parser.add_argument("--verbose", action="store_true",
                        help="show DeepSpeed's INFO lines, library warnings and wandb's summary (logging.verbose)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logging.progress: false)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="override config values")


def cli_main(args: argparse.Namespace) -> int:
    try:
        flags = (["logging.verbose=true"] if args.verbose else []) + (["logging.progress=false"] if args.no_progress else [])
        cfg = load_config(args.config, args.overrides + flags)
        env = distributed.detect(os.environ)
        summary = train(cfg, args.deepspeed_config or DEFAULT_DS_CONFIG, env)
    except (ConfigError, distributed.LaunchError, TrainingError) as e:
        print(f"megapile: error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        if not _is_collective_timeout(e):
            raise
        print(f"megapile: error: a collective did not complete within train.collective_timeout_s="
              f"{cfg.train.collective_timeout_s:g} s: another rank stopped responding or died; restart the job "
              f"to resume from the last checkpoint ({' '.join(str(e).split())[:200]})", file=sys.stderr)
        return 1
    if env.is_main and summary.get("val_loss") is not None:
        print(f"final validation loss: {summary['val_loss']:.4f}")
    return summary["exit_code"]


@dataclass
class Run:
    """Everything a training loop needs, built once by `setup`."""

    cfg: Config
    env: distributed.DistEnv
    device: torch.device
    engine: object
    scheduler: object
    batches: Batches
    valid_batches: Optional[Batches]
    logger: object
    ckpt_dir: str
    accum: int
    flops_per_token: int
    peak_tflops: float
    fingerprints: dict
    param_order: list  # parameter names in the order the optimizer numbers them
    layout: object = None  # megapile.parallel.layout.Layout: tensor × pipeline × data ranks
    components: list = field(default_factory=list)  # megapile.component_eval.Component: per-component validation
    tokenizer_files: dict = None  # {path in a checkpoint: bytes}: the tokenizer every checkpoint carries


def train(cfg: Config, ds_config_path: str, env: distributed.DistEnv) -> dict:
    """Run the whole job; return the final numbers (step, loss, val_loss, exit_code)."""
    stop = StopFlag()
    stop.install()  # before the slow start-up: a signal then still ends in a clean exit
    run = setup(cfg, ds_config_path, env)
    try:
        start = resume(run)
        run.logger.rewind(start.step)  # drop steps logged after the checkpoint (all of them on a fresh start)
        return loop(run, start, stop)
    finally:
        # In order: sinks, the engine (ZeRO-3 hooks and threads), then the process group. Leaving them to
        # interpreter teardown lets DeepSpeed's ZeRO-3 abort a finished process on CPU.
        run.logger.close()
        run.engine.destroy()
        distributed.shutdown()


def setup(cfg: Config, ds_config_path: str, env: distributed.DistEnv) -> Run:
    from megapile.data.samples import build_samples
    from megapile.flops import peak_tflops
    from megapile.hf_export import apply_init_from
    from megapile.metrics import MetricsLogger
    from megapile.model import build_model, param_groups
    from megapile.parallel.layout import check_vocab, resolve_layout
    from megapile.parallel.zero import load_ds_json, resolve_ds_config, resolve_dtype, wrap_zero

    console.configure(cfg.logging.verbose)
    # Everything that can be checked before starting processes and building the model is checked here.
    ds_json = load_ds_json(ds_config_path)
    init_weights = apply_init_from(cfg)  # model.init_from: shapes (and tokenizer) from a local HF directory
    layout = resolve_layout(cfg, env.world_size, ds_json.get("zero_optimization", {}).get("stage", 0))
    if cfg.model.compile and (layout.tensor > 1 or layout.pipeline > 1):
        raise ConfigError("model.compile is supported with ZeRO data parallelism only (parallel.tensor and "
                          "parallel.pipeline 1); set model.compile: false")
    accum = grad_accum_steps(cfg.train, layout.data)
    _absolute_data_paths(cfg)
    _check_data_paths(cfg)
    tokenizer_print, tokenizer_files = _tokenizer_facts(cfg)
    check_vocab(cfg, layout)
    ckpt_dir = checkpoint.checkpoint_dir(cfg.checkpoint, cfg.logging.run_dir)
    checkpoint.check_writable(ckpt_dir, env.rank)  # on every rank, so no rank waits for one that gave up

    device = torch.device("cuda", env.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        _set_cpu_threads(env)
    with console.library_output(cfg.logging.verbose):  # DeepSpeed's "shm comm op built" line
        distributed.init(env, backend="nccl" if device.type == "cuda" else "gloo",
                         timeout_s=cfg.train.collective_timeout_s)
    dtype = resolve_dtype(cfg, device)
    ds_config = resolve_ds_config(ds_json, cfg, layout.data, dtype, ds_config_path)

    _seed_everything(cfg.train.seed, layout.seed_rank(env.rank))
    seq_len = cfg.train.seq_len
    train_specs = cfg.data.train_specs()
    train_stream = build_samples([s.prefix for s in train_specs], [s.weight for s in train_specs],
                                 seq_len, cfg.train.seed, cache_dir=cfg.data.cache_dir)
    valid_specs = cfg.data.valid_specs()
    valid_stream = (build_samples([s.prefix for s in valid_specs], [s.weight for s in valid_specs],
                                  seq_len, cfg.train.seed, cache_dir=cfg.data.cache_dir) if valid_specs else None)

    if layout.pipeline > 1:  # each stage builds and initialises only its own layers (parallel/pipeline.py)
        from megapile.model import GPT

        with torch.device("meta"):
            model = GPT(cfg.model)
    else:
        model = build_model(cfg.model, seed=cfg.train.seed, device=device)
        if init_weights is not None:
            model.load_state_dict(init_weights)
        if cfg.model.compile:
            from megapile.model import compile_blocks

            compile_blocks(model)  # lazily: each block's graph is traced on its first forward
    flops_per_token = model.flops_per_token(seq_len)
    n_params = model.num_params(exclude_embedding=False)
    groups = param_groups(model, cfg.optim.weight_decay)
    names = {id(p): n for n, p in model.named_parameters()}
    param_order = [names[id(p)] for g in groups for p in g["params"]]  # before ZeRO rewrites the groups
    if layout.pipeline > 1:
        from megapile.parallel.pipeline import wrap_pipeline

        engine, _, scheduler = wrap_pipeline(cfg, ds_config, layout.pipeline)
    elif layout.tensor > 1:
        from megapile.parallel.tensor import wrap_tensor_parallel

        engine, _, scheduler = wrap_tensor_parallel(model, groups, cfg, ds_config, layout.tensor)
    else:
        engine, _, scheduler = wrap_zero(model, groups, cfg, ds_config)

    logger = MetricsLogger(cfg.logging, cfg.to_dict(), enabled=env.is_main)
    if env.is_main:
        _write_resolved_config(cfg, ds_config)
    peak, peak_source = peak_tflops(device, torch.float32 if dtype == "fp32" else torch.bfloat16, cfg.train.peak_tflops)
    logger.message(
        f"megapile: {n_params / 1e6:.2f}M parameters, world {env.world_size} ({env.launcher}), "
        f"ZeRO-{engine.zero_optimization_stage()}, {_precision(ds_config, dtype)}, micro {cfg.train.micro_batch_size} × accum {accum} "
        f"× dp {layout.data} = global {cfg.train.global_batch_size}, seq {seq_len}, {layout.describe()}; "
        f"MFU against {peak:.2f} TFLOP/s ({peak_source})"
    )
    def batches(stream):
        return Batches(stream, cfg.train.global_batch_size, cfg.train.micro_batch_size, layout.data_rank(env.rank),
                       layout.data)

    components = (component_eval.components(
        [s.prefix for s in valid_specs],
        lambda prefix: batches(build_samples([prefix], [1.0], seq_len, cfg.train.seed, cache_dir=cfg.data.cache_dir)))
        if cfg.train.eval_components else [])
    return Run(cfg, env, device, engine, scheduler, batches(train_stream),
               batches(valid_stream) if valid_stream is not None else None, logger,
               ckpt_dir, accum, flops_per_token, peak,
               {"tokenizer": tokenizer_print, "train_data": train_stream.fingerprint}, param_order, layout,
               tokenizer_files=tokenizer_files, components=components)


def _precision(ds_config: dict, dtype: str) -> str:
    """The start-up line's precision: the training dtype and, under bf16/fp16, what gradients are summed in."""
    accum_dtype = ds_config.get("data_types", {}).get("grad_accum_dtype", dtype)
    if dtype == "fp32":
        return dtype
    why = ""
    if accum_dtype != "fp32" and ds_config.get("zero_optimization", {}).get("stage", 0) == 0:
        why = ": DeepSpeed's ZeRO-0 has no fp32 accumulation, ZeRO-1 has"
    return f"{dtype} (gradients summed in {accum_dtype}{why})"


@dataclass
class Position:
    """Where training stands: optimizer steps done, global samples and tokens consumed."""

    step: int = 0
    sample_index: int = 0
    tokens_seen: int = 0

    @classmethod
    def of(cls, found: "checkpoint.Found") -> "Position":
        state = found.state
        return cls(found.step, int(state["sample_index"]), int(state["tokens_seen"]))


def resume(run: Run) -> Position:
    """Load the checkpoint `checkpoint.resume` asks for (auto: the newest intact one; a path: that one, which
    may be older than the newest: a rollback); return where training goes on."""
    cfg = run.cfg.checkpoint
    if cfg.resume == "none":
        return Position()
    checksums = cfg.verify == "checksum"
    if cfg.resume == "auto":
        found = checkpoint.find_resumable(run.ckpt_dir, checksums, warn=run.logger.message if run.env.is_main else
                                          (lambda text: None))
        if found is None:
            return Position()
    elif _already_rolled_back(run.ckpt_dir, cfg.resume):  # a restart after the rollback: keep the new branch
        found = checkpoint.find_resumable(run.ckpt_dir, checksums, warn=run.logger.message if run.env.is_main else
                                          (lambda text: None)) or checkpoint.open_checkpoint(cfg.resume, checksums)
        run.logger.message(f"checkpoint.resume: {cfg.resume} was rolled back to already; resuming this branch's "
                           f"newest checkpoint {found.path}")
    else:
        found = checkpoint.open_checkpoint(cfg.resume, checksums)
    compat.check(found.state, run.cfg.to_dict()["model"], run.fingerprints, cfg.allow_data_change, found.path)
    if run.layout is not None:
        from megapile.parallel.layout import check_same_layout

        check_same_layout(found.state, run.layout, run.engine.zero_optimization_stage(), found.path)
    old_layout = (found.state["zero_stage"], found.state["world_size"])
    new_layout = (run.engine.zero_optimization_stage(), run.env.world_size)
    if old_layout == new_layout:
        checkpoint.load(run.engine, found, run.env.rank, run.env.world_size)
    else:
        from megapile.checkpoint import portable

        run.logger.message(
            f"checkpoint {found.path} is ZeRO-{old_layout[0]} on {old_layout[1]} ranks, this run ZeRO-{new_layout[0]} "
            f"on {new_layout[1]}: resharding through full fp32 weights and Adam moments. Dropout RNG streams "
            "cannot follow a change of world size; they are reseeded from (seed, step, rank)."
        )
        full = portable.read_full_state(found.path, old_layout[0], run.param_order)
        portable.apply_full_state(run.engine, full, show_progress=run.env.is_main and run.cfg.logging.progress)
        _seed_everything(run.cfg.train.seed + found.step, run.layout.seed_rank(run.env.rank))
    position = Position.of(found)
    run.logger.message(f"resumed from {found.path} at step {found.step} "
                       f"(sample {position.sample_index}, {position.tokens_seen:,} tokens seen)")
    saved_batch = found.state.get("config", {}).get("train", {}).get("global_batch_size")
    if saved_batch is not None and saved_batch != run.cfg.train.global_batch_size:
        run.logger.message(f"train.global_batch_size changed from {saved_batch} to {run.cfg.train.global_batch_size}: "
                           f"the next step reads global samples from {position.sample_index} on")
    _set_aside_newer(run, found)
    return position


def _already_rolled_back(ckpt_dir: str, path: str) -> bool:
    """True when `path` is the checkpoint this directory last rolled back to and training has saved past it."""
    done = checkpoint.rolled_back_to(ckpt_dir)
    if done is None or done != os.path.normpath(os.path.abspath(path)):
        return False
    newest = checkpoint.list_complete(ckpt_dir)
    return bool(newest) and os.path.normpath(os.path.abspath(os.path.join(ckpt_dir, newest[0][1]))) != done


def _set_aside_newer(run: Run, found: "checkpoint.Found") -> None:
    """Resuming an older checkpoint of this run's own directory (a rollback): its newer checkpoints are a future
    that will be retrained; they are moved aside so that an automatic restart never resumes them."""
    if os.path.normpath(os.path.dirname(found.path)) != os.path.normpath(run.ckpt_dir):
        return
    if run.env.is_main:
        moved = checkpoint.set_aside_newer(run.ckpt_dir, found.step)
        if moved:
            run.logger.message(f"rolled back to step {found.step}: {', '.join(moved)} moved to "
                               f"{run.ckpt_dir}/rolled_back/ (not deleted; automatic resumes no longer pick them)")
    if run.env.world_size > 1:
        torch.distributed.barrier()


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. repeated non-finite losses); the message is one line."""


def loop(run: Run, start: Position, stop: StopFlag) -> dict:
    cfg, env, engine = run.cfg, run.env, run.engine
    tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_len
    start_step, position = start.step, start
    summary = {"step": start_step, "loss": None, "val_loss": None, "exit_code": 0}
    bar = progress.bar(desc="train", total=cfg.train.max_steps, initial=start_step, unit="step", leave=True,
                       enabled=env.is_main and cfg.logging.progress)
    window_losses: list[torch.Tensor] = []
    window_seconds = 0.0  # training time only: evaluation, saving and logging are timed apart, not counted
    save_seconds = None  # the save since the last record, logged with the next one
    loop_start = time.perf_counter()  # wall time of this start, evaluation and saving included: for the ETA
    intervals = []  # (steps, seconds) of each logged interval, for the end-of-run throughput summary
    skipped_total, first_bad = 0, None
    for step in range(start_step, cfg.train.max_steps):
        first_sample = position.sample_index
        step_start = time.perf_counter()
        loss, grad_norm, skipped = train_step(run, first_sample)
        position = Position(step + 1, first_sample + cfg.train.global_batch_size, position.tokens_seen + tokens_per_step)
        window_losses.append(loss)
        bar.update(1)
        done = step + 1
        last = done == cfg.train.max_steps
        stopping, bad_loss = _any_rank([stop.requested, not bool(torch.isfinite(loss))], env)
        window_seconds += time.perf_counter() - step_start  # the flags' all-reduce waits for the step to finish
        if skipped or bad_loss:  # every rank agrees: the grad norm is global, the flags all-reduced
            skipped_total += 1
            first_bad = first_bad or (done, first_sample)
            _check_bad_streak(run, first_bad, done)
        else:
            first_bad = None
        val_loss = eval_seconds = None
        if run.valid_batches is not None and ((cfg.train.eval_every and done % cfg.train.eval_every == 0) or last):
            eval_start = time.perf_counter()
            shown = env.is_main and cfg.logging.progress
            val_loss = evaluate(engine, run.valid_batches, cfg.train.eval_iters, env, run.device, shown)
            by_component = {}
            for component in run.components:
                loss_c = evaluate(engine, component.batches, cfg.train.eval_iters, env, run.device, shown)
                by_component.update({f"val_loss/{component.name}": loss_c,
                                     f"val_bpb/{component.name}": component.bits_per_byte(loss_c)})
            eval_seconds = time.perf_counter() - eval_start
        if done % cfg.train.log_every == 0 or last or stopping or val_loss is not None:
            elapsed = max(window_seconds, 1e-9)
            loss_value = _mean_over_ranks(torch.stack(window_losses).mean(), env)
            tokens_per_s = tokens_per_step * len(window_losses) / elapsed
            tflops = run.flops_per_token * tokens_per_s / env.world_size / 1e12
            record = {
                "step": done,
                "loss": loss_value,
                "lr": run.scheduler.get_last_lr()[0],
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "tokens_per_s": tokens_per_s,
                "tflops_per_device": tflops,
                "mfu": tflops / run.peak_tflops,
                "samples_seen": position.sample_index,
                "tokens_seen": position.tokens_seen,
                "skipped_steps": skipped_total,
                "elapsed_seconds": (wall := time.perf_counter() - loop_start),
                "eta_seconds": wall / (done - start_step) * (cfg.train.max_steps - done),
            }
            if val_loss is not None:
                record.update(val_loss=val_loss, eval_seconds=eval_seconds, **by_component)
            if save_seconds is not None:
                record["save_seconds"], save_seconds = save_seconds, None
            run.logger.log(record, console=bar.write)
            intervals.append((len(window_losses), elapsed))
            summary.update(step=done, loss=loss_value, val_loss=val_loss if val_loss is not None else summary["val_loss"])
            window_losses, window_seconds = [], 0.0
        scheduled = (cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or last or stopping
        if scheduled and first_bad is None:  # never checkpoint inside a run of skipped steps
            save_start = time.perf_counter()
            save(run, position, must_succeed=last or stopping)
            save_seconds = time.perf_counter() - save_start
        if stopping:
            run.logger.message(f"stopped by {stop.signal_name or 'a signal on another rank'} after step {done}; "
                               f"exit code {EXIT_CHECKPOINTED} (restart the same command to resume)")
            summary["exit_code"] = EXIT_CHECKPOINTED
            break
    bar.close()
    summary.update(_throughput_summary(run, intervals))
    return summary


def _throughput_summary(run: Run, intervals: list[tuple[int, float]]) -> dict:
    """Mean tokens/s, TFLOP/s per device and MFU over the run's logged intervals, the first one (compilation,
    allocator and kernel warm-up) left out when there are others; printed as one line and returned."""
    if not intervals:
        return {}
    counted = intervals[1:] or intervals
    steps, seconds = sum(n for n, _ in counted), sum(t for _, t in counted)
    tokens_per_s = steps * run.cfg.train.global_batch_size * run.cfg.train.seq_len / seconds
    tflops = run.flops_per_token * tokens_per_s / run.env.world_size / 1e12
    mfu = tflops / run.peak_tflops
    if run.device.type == "cuda":
        peak_gib, where = torch.cuda.max_memory_allocated(run.device) / 2**30, "allocated on the GPU"
    else:
        import resource

        peak_gib, where = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "resident (peak RSS)"
    warmup = "first interval excluded as warm-up" if len(intervals) > 1 else "one interval, warm-up included"
    run.logger.message(
        f"throughput over {steps} steps ({warmup}): {tokens_per_s:,.0f} tokens/s, {tflops:.3f} TFLOP/s per device, "
        f"MFU {mfu:.1%} of {run.peak_tflops:.2f} TFLOP/s; peak memory {peak_gib:.2f} GiB {where} on rank 0"
    )
    return {"tokens_per_s": tokens_per_s, "tflops_per_device": tflops, "mfu": mfu, "peak_memory_gib": peak_gib}


def train_step(run: Run, first_sample: int) -> tuple[torch.Tensor, Optional[float], bool]:
    """One optimizer step over this rank's micro-batches of the global batch that starts at `first_sample`:
    (mean loss, global grad norm, update skipped).

    A non-finite gradient norm skips the update: DeepSpeed's ZeRO and bf16/fp16 optimizers do that
    themselves (and count it in `skipped_steps`); for ZeRO-0 in fp32 megapile's guard on the optimizer's
    step does the same (megapile/parallel/plain_step.py).
    """
    engine = run.engine
    skipped_before = engine.skipped_steps
    if _is_pipeline(engine):  # DeepSpeed runs the micro-batches itself (1F1B); the loss comes from the last stage
        loss = engine.train_batch(iter(run.batches.micro_batches(first_sample, run.device)))
        return loss.detach().float(), engine.get_global_grad_norm(), engine.skipped_steps > skipped_before
    loss_sum = torch.zeros((), device=run.device)
    for x, y in run.batches.micro_batches(first_sample, run.device):
        loss = engine(x, targets=y)
        engine.backward(loss)
        loss_sum += loss.detach().float()
        engine.step()  # a real optimizer step only at the accumulation boundary
    skipped = engine.skipped_steps > skipped_before
    if skipped:
        zero.after_skipped_step(engine)
    return loss_sum / run.accum, engine.get_global_grad_norm(), skipped


def _check_bad_streak(run: Run, first_bad: tuple[int, int], done: int) -> None:
    """`first_bad`: (step, first global sample) of the first step of the current streak of skipped steps."""
    limit = run.cfg.train.max_bad_steps
    first_bad, sample = first_bad
    if done - first_bad + 1 < limit:
        return
    g = run.cfg.train.global_batch_size
    raise TrainingError(
        f"steps {first_bad}-{done}: {done - first_bad + 1} consecutive steps had a non-finite loss or gradient "
        f"norm and their updates were skipped (train.max_bad_steps={limit}); the first bad batch is global samples "
        f"[{sample}, {sample + g}) of data.train; the weights are those after step {first_bad - 1} "
        f"and no checkpoint was written since"
    )


def save(run: Run, position: Position, must_succeed: bool = False) -> None:
    """Checkpoint `step`. A failed save raises when `must_succeed` (last step, stop signal) or when
    checkpoint.on_save_error is "stop"; otherwise it is reported and training goes on."""
    cfg = run.cfg
    step = position.step
    state = {
        "step": step,
        "sample_index": position.sample_index,
        "tokens_seen": position.tokens_seen,
        "world_size": run.env.world_size,
        "zero_stage": run.engine.zero_optimization_stage(),
        "parallel": run.layout.as_dict() if run.layout is not None else {"tensor": 1, "pipeline": 1},
        "config": cfg.to_dict(),
        "fingerprints": run.fingerprints,
        "param_order": run.param_order,  # how a ZeRO-0 optimizer numbers (and bf16/fp16 flattens) the parameters
        "versions": _versions(),
    }
    if _any_rank([not _weights_finite(run.engine)], run.env)[0]:
        raise TrainingError(f"step {step}: the weights contain NaN or Inf; refusing to save a checkpoint over good ones")
    try:
        figures = checkpoint.save(run.engine, run.ckpt_dir, step, state, cfg.checkpoint, run.env.is_main,
                                  files=run.tokenizer_files, show_progress=cfg.logging.progress)
    except checkpoint.CheckpointError as e:
        if must_succeed or cfg.checkpoint.on_save_error == "stop":
            raise TrainingError(str(e)) from None
        run.logger.message(f"error: {e}; training continues (checkpoint.on_save_error=continue)")
        return
    if figures:
        run.logger.message(f"saved checkpoint {run.ckpt_dir}/global_step{step}: {figures['save_mb']:.1f} MB in "
                           f"{figures['save_seconds']:.2f} s ({figures['save_mb_per_s']:.0f} MB/s)")


@torch.no_grad()
def evaluate(engine, batches: Batches, iters: int, env: distributed.DistEnv, device: torch.device,
             show_progress: bool = False) -> float:
    """Mean loss over the first `iters` global batches of validation data, split across ranks like
    training batches, so every world size scores exactly the same samples."""
    engine.eval()
    steps = progress.bar(range(iters), desc="validation", unit="batch", enabled=show_progress)
    if _is_pipeline(engine):  # one pipelined pass per global batch; every stage gets the loss
        losses = [engine.eval_batch(iter(batches.micro_batches(it * batches.global_batch, device))).float()
                  for it in steps]
    else:
        losses = [engine(x, targets=y).float() for it in steps
                  for x, y in batches.micro_batches(it * batches.global_batch, device)]
    engine.train()
    return _mean_over_ranks(torch.stack(losses).mean(), env)


def _is_pipeline(engine) -> bool:
    return bool(getattr(engine, "pipeline_parallelism", False))


def _mean_over_ranks(value: torch.Tensor, env: distributed.DistEnv) -> float:
    if env.world_size > 1:
        value = value.clone()
        torch.distributed.all_reduce(value)
        value /= env.world_size
    return float(value)


def _set_cpu_threads(env: distributed.DistEnv) -> None:
    """The deepspeed launcher leaves OMP_NUM_THREADS unset: split the cores between local ranks."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    local_world = next((int(os.environ[k]) for k in ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE",
                                                      "SLURM_NTASKS_PER_NODE") if os.environ.get(k, "").isdigit()),
                       env.world_size)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))


def _seed_everything(seed: int, rank: int) -> None:
    """Dropout and anything else random differ per `rank` (Layout.seed_rank) but are fixed by (seed, rank)."""
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)


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
    from megapile.data import DataError
    from megapile.data.tokenizer import load_tokenizer

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


def _is_collective_timeout(error: RuntimeError) -> bool:
    text = str(error).lower()
    return "timed out" in text or "timeout" in text


def _any_rank(flags: list[bool], env: distributed.DistEnv) -> list[bool]:
    """Each flag true on every rank when it is true on one (one all-reduce): ranks must act at the same step."""
    if env.world_size == 1:
        return list(flags)
    t = torch.tensor([int(f) for f in flags])
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def _weights_finite(engine) -> bool:
    """This rank's share of the weights (ZeRO-3 keeps a partition in ds_tensor) is all finite."""
    return all(bool(torch.isfinite(getattr(p, "ds_tensor", p)).all()) for p in engine.module.parameters())


def _versions() -> dict[str, str]:
    import deepspeed

    import megapile

    return {"megapile": megapile.__version__, "deepspeed": deepspeed.__version__, "torch": torch.__version__}


def _write_resolved_config(cfg: Config, ds_config: dict) -> None:
    os.makedirs(cfg.logging.run_dir, exist_ok=True)
    with open(os.path.join(cfg.logging.run_dir, "config.yaml"), "w") as f:
        yaml.safe_dump({**cfg.to_dict(), "deepspeed": ds_config}, f, sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megapile train", description=__doc__.split("\n\n")[0])
    add_cli(parser)
    return cli_main(parser.parse_args(argv))


if __name__ == "__main__":
    exit_now(main())  # not sys.exit: see megapile/process_exit.py
