"""Train a GPT on preprocessed Pile data with DeepSpeed: build the run, resume, train, evaluate, save.

    deepspeed megapile/train.py --deepspeed_config ds_configs/zero2.json --config configs/tiny.yaml
    torchrun --nproc_per_node 2 megapile/train.py --config configs/tiny.yaml parallel.zero_stage=1
    python megapile/train.py --config configs/tiny.yaml train.max_steps=50 optim.lr=3e-4

Reading order: the CLI, `train` (build, resume, loop, tear down), the loop and what it calls per step. The
position in training is one integer, the global sample index, saved with every checkpoint
(megapile/data/loader.py: every world size reads the same samples in the same order). Building the run is
megapile/training/build.py (the engine: megapile/parallel/parallelize.py); choosing, loading and writing checkpoints
is megapile/checkpoint/manager.py.
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
import resource
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Optional

import torch

from megapile.checkpoint import manager
from megapile.checkpoint.manager import TrainingError
from megapile.config import Config, ConfigError, load_config
from megapile.data.loader import Batches
from megapile.parallel import loss_scale
from megapile.parallel.collectives import agree, mean_over_ranks
from megapile.parallel.lagged_flag import LaggedFlag
from megapile.parallel.parallelize import is_pipelined
from megapile.parallel.step_guard import after_skipped_step
from megapile.reporting import progress
from megapile.runtime import distributed, peers
from megapile.runtime.process_exit import exit_now, say_error
from megapile.runtime.signals import EXIT_CHECKPOINTED, StopFlag
from megapile.training.build import build
from megapile.training.run_state import Position, Run
from megapile.training.spikes import Rollback, Verdict, first_sample_after_skips


def add_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML run config (configs/*.yaml); defaults apply without it")
    parser.add_argument("--deepspeed_config", "--deepspeed-config", default=None,
                        help="a DeepSpeed JSON to take ZeRO settings from (parallel.* keys the YAML leaves unset; any that "
                             "disagree with the YAML are an error); default: generated from the YAML alone")
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
        summary = train(cfg, args.deepspeed_config, env)
    except peers.PeerLost as e:
        if e.reporter is None or e.reporter.claim():  # else the heartbeat has said it and is ending the process
            say_error(f"megapile: error: {e}")
        return 1
    except (ConfigError, distributed.LaunchError, TrainingError) as e:
        say_error(f"megapile: error: {e}")
        return 1
    except RuntimeError as e:  # a rank lost while the run was being built
        if not distributed.collective_failed(e):
            raise
        say_error(f"megapile: error: {peers.failure_line(None, 0, e, None, cfg.train.collective_timeout_s)}")
        return 1
    if env.is_main and summary.get("val_loss") is not None:
        print(f"final validation loss: {summary['val_loss']:.4f}")
    return summary["exit_code"]


def train(cfg: Config, ds_config_path: Optional[str], env: distributed.DistEnv) -> dict:
    """Run the whole job; return the final numbers (step, loss, val_loss, exit_code)."""
    stop = StopFlag()
    stop.install()  # before the slow start-up: a signal then still ends in a clean exit
    run = build(cfg, ds_config_path, env)
    healthy = True  # the process group: false after a collective failed (a rank hung or died)
    try:
        start = manager.resume(run)
        while True:
            run.logger.rewind(start.step)  # drop steps logged after the checkpoint (all of them on a fresh start)
            summary = loop(run, start, stop)
            if "rollback" not in summary:
                return summary
            manager.finish(run, why="the loss-spike rollback")  # the rollback may choose the save in flight
            start = manager.roll_back(run, summary["rollback"])  # train.spike: too many loss spikes
    except RuntimeError as e:
        healthy = not distributed.collective_failed(e)
        if healthy:
            raise
        beat = run.heartbeat
        raise peers.PeerLost(peers.failure_line(run.peers, run.env.rank, e, beat.step if beat else 0,
                                                cfg.train.collective_timeout_s), beat.reporter if beat else None) from None
    finally:
        # In order: the heartbeat (before any rank may finish, so none is taken for dead), sinks and readers, the
        # engine (ZeRO-3 hooks and threads), then the process group. Leaving them to interpreter teardown lets
        # DeepSpeed's ZeRO-3 abort a finished process on CPU.
        if run.heartbeat is not None and healthy:
            run.heartbeat.stop()
        run.logger.close()
        run.close()
        if healthy:  # DeepSpeed's teardown may talk to the other ranks
            run.engine.destroy()
        distributed.shutdown(healthy)


@dataclass
class _Tally:
    """What the loop adds up between log records, and over the run."""

    losses: list = field(default_factory=list)  # this window's step losses (tensors: read once per record)
    seconds: float = 0.0  # this window's training time only: evaluation, saving and logging are timed apart
    intervals: list = field(default_factory=list)  # (steps, seconds) of each logged window, for the summary
    skipped: int = 0  # steps whose update was skipped (non-finite, a loss spike or fp16's loss-scale search)
    spikes: int = 0  # of those, the loss spikes (train.spike)
    loss_scale_skips: int = 0  # of those, fp16 overflows at a finite loss: the loss scale halved, not bad data
    first_bad: Optional[tuple[int, int]] = None  # (step, first global sample) of the current streak of skips
    save_seconds: Optional[float] = None  # the save since the last record, logged with the next one


def loop(run: Run, start: Position, stop: StopFlag) -> dict:
    cfg = run.cfg
    summary = {"step": start.step, "loss": None, "val_loss": None, "exit_code": 0}
    bar = progress.bar(desc="train", total=cfg.train.max_steps, initial=start.step, unit="step", leave=True,
                       enabled=run.env.is_main and cfg.logging.progress)
    tally, position, stop_flag = _Tally(), start, LaggedFlag(run.env.world_size, run.device)
    loop_start = time.perf_counter()  # wall time of this start, evaluation and saving included: for the ETA
    for step in range(start.step, cfg.train.max_steps):
        step_start = time.perf_counter()
        if run.heartbeat is not None:
            run.heartbeat.step = step + 1  # named in the line if a rank is lost during it
        first_sample = first_sample_after_skips(position.sample_index, cfg.train.global_batch_size,
                                                position.skip_samples)
        loss, grad_norm, skipped, verdict = train_step(run, first_sample)
        position = Position(step + 1, first_sample + cfg.train.global_batch_size,
                            position.tokens_seen + cfg.train.global_batch_size * cfg.train.seq_len,
                            position.skip_samples)
        bar.update(1)
        done, last = step + 1, step + 1 == cfg.train.max_steps
        # A stop request on any rank stops every rank one step later (no host sync: megapile/parallel/lagged_flag.py)
        stopping = stop_flag.exchange(stop.requested)
        tally.losses.append(loss)  # a tensor: read on the host once per log record
        tally.seconds += time.perf_counter() - step_start
        spiked = verdict is not None and verdict.spike
        # A non-finite loss makes a non-finite gradient norm, so its update is skipped on every rank (step_guard)
        _count_bad_step(run, tally, None if spiked else skipped, done, first_sample)
        rollback = None
        if verdict is not None:  # the gradient norm too, the same on every rank (NaN where one has none, or skipped)
            norm = math.nan if grad_norm is None or verdict.spike else float(grad_norm)
            rollback = _observe_spikes(run, tally, verdict, agree([], [norm], run.env.world_size)[1][0], done,
                                       first_sample)
        if rollback is not None:
            summary["rollback"] = rollback
            break
        evaluation = _evaluate_if_due(run, done, last)
        if done % cfg.train.log_every == 0 or last or stopping or evaluation:
            record = _record(run, tally, position, grad_norm, evaluation, time.perf_counter() - loop_start, start.step)
            run.logger.log(record)  # its console line lifts the progress bar (tqdm.write)
            summary.update(step=done, loss=record["loss"], val_loss=record.get("val_loss", summary["val_loss"]))
        # Periodic saves wait out a streak of skipped steps; the last step and a stop always save: a skipped
        # update left the weights as they were, and exit code 75 promises a checkpoint of this very step.
        periodic = bool(cfg.checkpoint.every) and done % cfg.checkpoint.every == 0 and not tally.first_bad
        save_start = time.perf_counter()
        committed = manager.poll(run)  # checkpoint.async: commit the background save once every rank has written
        if periodic or last or stopping:
            manager.save(run, position, must_succeed=last or stopping)
        if committed or periodic or last or stopping:  # the time saving blocked training
            tally.save_seconds = (tally.save_seconds or 0.0) + time.perf_counter() - save_start
        if stopping:
            run.logger.message(f"stopped by {stop.signal_name or 'a signal on another rank'} after step {done}; "
                               f"exit code {EXIT_CHECKPOINTED} (restart the same command to resume)")
            summary["exit_code"] = EXIT_CHECKPOINTED
            break
    stop_flag.drain()  # leave no all-reduce outstanding on the group
    bar.close()
    summary.update(_throughput_summary(run, tally.intervals))
    return summary


def _observe_spikes(run: Run, tally: _Tally, verdict: Verdict, norm: float, done: int,
                    first_sample: int) -> Optional[Rollback]:
    """Feed the step to the spike detector; say what a spike did. A Rollback when the spikes are too many.
    `norm`: the step's gradient norm, agreed by all ranks; NaN when there is none."""
    samples = (first_sample, first_sample + run.cfg.train.global_batch_size)
    norm = norm if math.isfinite(norm) else None
    norm_z = run.spikes.norm_z(norm)
    if verdict.spike:
        tally.spikes += 1
        tally.skipped += 1  # skipped_steps counts every update not applied
        run.logger.message(f"step {done}: loss spike skipped: loss {verdict.loss:.4f} is {verdict.z:.1f} standard "
                           f"deviations above the last {len(run.spikes.losses)} steps (train.spike.z_threshold="
                           f"{run.cfg.train.spike.z_threshold:g}); global samples [{samples[0]}, {samples[1]})")
    elif norm_z > run.cfg.train.spike.z_threshold:
        run.logger.message(f"step {done}: gradient-norm spike: {norm:.4g} is {norm_z:.1f} standard deviations "
                           f"above the window (applied, clipped to optim.grad_clip; counts toward a rollback); "
                           f"global samples [{samples[0]}, {samples[1]})")
    return run.spikes.observe(done, samples, verdict, norm)


def _count_bad_step(run: Run, tally: _Tally, skipped: Optional[str], done: int, first_sample: int) -> None:
    """`skipped`: why the step's update was not applied (train_step), None where it was or for a loss spike
    (counted by _observe_spikes). Only SKIP_BAD steps make a streak toward train.max_bad_steps: fp16's loss-scale
    search skips by design, and its finite loss ends a streak of non-finite ones."""
    if skipped is not None:
        tally.skipped += 1
    if skipped != SKIP_BAD:
        tally.first_bad = None
        if skipped == SKIP_LOSS_SCALE:
            tally.loss_scale_skips += 1
            scaler = loss_scale.scaler(run.engine)
            run.logger.message(f"step {done}: update skipped by fp16's loss scaling: the gradients overflowed at a "
                               f"finite loss; loss scale now {scaler.cur_scale:g} (not counted toward "
                               f"train.max_bad_steps)")
        return
    tally.first_bad = tally.first_bad or (done, first_sample)
    run.logger.message(f"step {done}: update skipped: non-finite loss or gradient norm, bad step "
                       f"{done - tally.first_bad[0] + 1} in a row (train.max_bad_steps={run.cfg.train.max_bad_steps})")
    _check_bad_streak(run, tally.first_bad, done)


def _evaluate_if_due(run: Run, done: int, last: bool) -> dict:
    """{val_loss, val_loss/<component>, val_bpb/<component>, eval_seconds} when validation is due, else {}."""
    cfg = run.cfg.train
    if run.valid_batches is None or not ((cfg.eval_every and done % cfg.eval_every == 0) or last):
        return {}
    eval_start = time.perf_counter()
    shown = run.env.is_main and run.cfg.logging.progress
    out = {"val_loss": evaluate(run.engine, run.valid_batches, cfg.eval_iters, run.env, run.device, shown)}
    for component in run.components:
        loss = evaluate(run.engine, component.batches, cfg.eval_iters, run.env, run.device, shown)
        out.update({f"val_loss/{component.name}": loss, f"val_bpb/{component.name}": component.bits_per_byte(loss)})
    out["eval_seconds"] = time.perf_counter() - eval_start
    return out


def _record(run: Run, tally: _Tally, position: Position, grad_norm: Optional[float], evaluation: dict,
            wall: float, start_step: int) -> dict:
    """One metrics record for the window that ends at `position`; starts the next window."""
    cfg, steps = run.cfg.train, len(tally.losses)
    elapsed = max(tally.seconds, 1e-9)
    tokens_per_s = cfg.global_batch_size * cfg.seq_len * steps / elapsed
    tflops = run.flops_per_token * tokens_per_s / run.env.world_size / 1e12
    record = {
        "step": position.step,
        "loss": mean_over_ranks(torch.stack(tally.losses).mean(), run.env.world_size),
        "lr": run.scheduler.get_last_lr()[0],
        "grad_norm": None if grad_norm is None else float(grad_norm),
        "tokens_per_s": tokens_per_s,
        "tflops_per_device": tflops,
        "mfu": tflops / run.peak_tflops,
        "samples_seen": position.sample_index,
        "tokens_seen": position.tokens_seen,
        "skipped_steps": tally.skipped,
        **({"spikes_skipped": tally.spikes} if run.spikes is not None else {}),
        # checkpoint.async: save steps (and ends) that had to wait for the previous save's background write
        **({"save_waits": run.background.waits} if run.background is not None else {}),
        **_loss_scale_fields(run, tally),
        "elapsed_seconds": wall,
        "eta_seconds": wall / (position.step - start_step) * (cfg.max_steps - position.step),
        **evaluation,
    }
    if tally.save_seconds is not None:
        record["save_seconds"], tally.save_seconds = tally.save_seconds, None
    if run.stragglers is not None:  # the largest ratio of a rank's forward time to the other ranks' median
        record["straggler_ratio"] = run.stragglers.check(position.step - steps + 1, position.step, run.logger.message)
    tally.intervals.append((steps, elapsed))
    tally.losses, tally.seconds = [], 0.0
    return record


def _loss_scale_fields(run: Run, tally: _Tally) -> dict:
    """fp16's dynamic loss scale and the steps its search skipped; nothing in fp32 and bf16."""
    scaler = loss_scale.scaler(run.engine)
    if scaler is None or not loss_scale.is_dynamic(scaler):
        return {}
    return {"loss_scale": float(scaler.cur_scale), "loss_scale_skips": tally.loss_scale_skips}


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
        peak_gib, where = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "resident (peak RSS)"
    warmup = "first interval excluded as warm-up" if len(intervals) > 1 else "one interval, warm-up included"
    run.logger.message(
        f"throughput over {steps} steps ({warmup}): {tokens_per_s:,.0f} tokens/s, {tflops:.3f} TFLOP/s per device, "
        f"MFU {mfu:.1%} of {run.peak_tflops:.2f} TFLOP/s; peak memory {peak_gib:.2f} GiB {where} on rank 0"
    )
    return {"tokens_per_s": tokens_per_s, "tflops_per_device": tflops, "mfu": mfu, "peak_memory_gib": peak_gib}


SKIP_BAD, SKIP_LOSS_SCALE = "bad", "loss scale"  # why a step's update was not applied (train_step)


def train_step(run: Run, first_sample: int) -> tuple[torch.Tensor, Optional[float], Optional[str],
                                                    Optional[Verdict]]:
    """One optimizer step over this rank's micro-batches of the global batch that starts at `first_sample`:
    (mean loss, global grad norm, why the update was skipped or None, spike verdict or None). A non-finite gradient
    norm skips the update on every engine (megapile/parallel/step_guard.py); so does a loss spike
    (megapile/training/spikes.py), judged after the last forward pass and before its backward."""
    engine = run.engine
    skipped_before, step = engine.skipped_steps, engine.global_steps + 1
    scale_before = _current_scale(engine)
    try:
        loss, verdict = (_pipelined_step if run.state.pipelined else _accumulated_step)(run, first_sample)
    except Exception as e:  # noqa: BLE001 (DeepSpeed's overflow at the minimum loss scale is a plain Exception)
        if not loss_scale.at_minimum(e):
            raise
        raise _overflow_at_minimum(run, step, first_sample) from None
    skipped = None
    if engine.skipped_steps > skipped_before:
        skipped = _skip_reason(run, loss, verdict, scale_before, step, first_sample)
        if not run.state.pipelined:
            after_skipped_step(engine)
    return loss, engine.get_global_grad_norm(), skipped, verdict


def _pipelined_step(run: Run, first_sample: int) -> tuple[torch.Tensor, Optional[Verdict]]:
    """DeepSpeed runs the micro-batches itself (1F1B); the loss comes from the last stage."""
    loss = run.engine.train_batch(iter(run.batches.micro_batches(first_sample, run.device))).detach().float()
    verdict = run.pipeline_judge.share() if run.pipeline_judge is not None else None
    if verdict is not None and verdict.spike:
        loss = torch.tensor(verdict.loss)  # the NaN that skipped the update is not the step's loss
    return loss, verdict


def _accumulated_step(run: Run, first_sample: int) -> tuple[torch.Tensor, Optional[Verdict]]:
    engine = run.engine
    loss_sum, verdict = torch.zeros((), device=run.device), None
    for j, (x, y) in enumerate(run.batches.micro_batches(first_sample, run.device)):
        with run.stragglers.timing() if run.stragglers is not None else nullcontext():
            loss = engine(x, targets=y)
        loss_sum += loss.detach().float()
        if run.spikes is not None and j == run.accum - 1:
            verdict = run.spikes.judge(mean_over_ranks(loss_sum / run.accum, run.env.world_size))
            if verdict.spike:
                loss = loss * float("nan")  # every engine skips the update of a non-finite gradient
        engine.backward(loss)
        engine.step()  # a real optimizer step only at the accumulation boundary
    return loss_sum / run.accum, verdict


def _current_scale(engine) -> Optional[float]:
    scaler = loss_scale.scaler(engine)
    return float(scaler.cur_scale) if scaler is not None and loss_scale.is_dynamic(scaler) else None


def _skip_reason(run: Run, loss: torch.Tensor, verdict: Optional[Verdict], scale_before: Optional[float], step: int,
                 first_sample: int) -> str:
    """SKIP_LOSS_SCALE for an fp16 overflow at a finite loss on every rank: a loss scale too high for the
    gradients, which the scaler has just lowered. SKIP_BAD otherwise: a non-finite loss is bad data in any
    precision (in fp16 it overflows too). Every rank takes the same branches: the skip itself is agreed."""
    if scale_before is None or (verdict is not None and verdict.spike):
        return SKIP_BAD
    if not math.isfinite(mean_over_ranks(loss, run.env.world_size)):  # one all-reduce, on skipped steps only
        return SKIP_BAD
    if loss_scale.stuck_at_minimum(loss_scale.scaler(run.engine), scale_before):
        raise _overflow_at_minimum(run, step, first_sample)
    return SKIP_LOSS_SCALE


def _overflow_at_minimum(run: Run, step: int, first_sample: int) -> TrainingError:
    scaler, g = loss_scale.scaler(run.engine), run.cfg.train.global_batch_size
    floor = loss_scale.minimum(scaler)
    lower = " or a lower fp16.min_loss_scale in the DeepSpeed JSON," if floor > 1 else ""
    return TrainingError(
        f"step {step}: fp16 gradients overflowed even at the minimum loss scale {floor:g} (fp16.min_loss_scale), "
        f"so no update can be applied (global samples [{first_sample}, {first_sample + g}) of data.train): the run "
        f"is diverging or its gradients outgrow fp16; restart from the last checkpoint with a lower optim.lr,{lower} "
        f"or with train.dtype bf16 (GPUs of compute capability 8.0 and up) or fp32"
    )


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


@torch.no_grad()
def evaluate(engine, batches: Batches, iters: int, env: distributed.DistEnv, device: torch.device,
             show_progress: bool = False) -> float:
    """Mean loss over the first `iters` global batches of validation data, split across ranks like
    training batches, so every world size scores exactly the same samples."""
    engine.eval()
    steps = progress.bar(range(iters), desc="validation", unit="batch", enabled=show_progress)
    if is_pipelined(engine):  # one pipelined pass per global batch; every stage gets the loss
        losses = [engine.eval_batch(iter(batches.micro_batches(it * batches.global_batch, device))).float()
                  for it in steps]
    else:
        losses = [engine(x, targets=y).float() for it in steps
                  for x, y in batches.micro_batches(it * batches.global_batch, device)]
    engine.train()
    return mean_over_ranks(torch.stack(losses).mean(), env.world_size)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megapile train", description=__doc__.split("\n\n")[0])
    add_cli(parser)
    return cli_main(parser.parse_intermixed_args(argv))


if __name__ == "__main__":
    exit_now(main())  # not sys.exit: see megapile/runtime/process_exit.py
