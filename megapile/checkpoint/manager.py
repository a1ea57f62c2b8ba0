"""Which checkpoint a run resumes, how it is loaded (as saved, or resharded), and what a save records.

`checkpoint.resume`: "auto" takes the newest intact checkpoint of the run's directory; a path takes that one,
which may be older than the newest: a rollback. Resuming an older checkpoint of the run's own directory moves
its newer ones aside (never deleted) so that an automatic restart never resumes the abandoned future.
"""
from __future__ import annotations

import json
import os
import time

import deepspeed
import torch

import megapile
from megapile import checkpoint
from megapile.checkpoint import collective, compat, fragments, manifest, portable, slices, state_file
from megapile.checkpoint.rng import seed_everything
from megapile.config import ConfigError
from megapile.parallel.collectives import any_rank
from megapile.parallel.layout import check_same_layout
from megapile.training import optim
from megapile.training.run_state import Position, Run
from megapile.training.spikes import Rollback, merge_ranges

SPIKE_FILE = "spikes.json"  # in the checkpoint directory: ranges rollbacks stepped over, and how many there were


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. repeated non-finite losses); the message is one line."""


def resume(run: Run) -> Position:
    """Load the checkpoint `checkpoint.resume` asks for; return where training goes on."""
    found = _choose(run)
    skip = merge_ranges(run.cfg.train.skip_samples, _spike_record(run.ckpt_dir)["skip_samples"])
    if found is None:
        _clear_pending(run)
        return Position(skip_samples=skip)
    compat.check(found.state, run.cfg.to_dict()["model"], run.fingerprints, run.cfg.checkpoint.allow_data_change,
                 found.path)
    _load(run, found)
    position = Position.of_state(found.step, found.state, skip)
    run.logger.message(f"resumed from {found.path} at step {found.step} "
                       f"(sample {position.sample_index}, {position.tokens_seen:,} tokens seen)")
    padding = compat.vocab_padding_change(found.state, run.cfg.to_dict()["model"])
    if padding:
        run.logger.message(padding)
    saved_batch = found.state.config["train"]["global_batch_size"]
    if saved_batch != run.cfg.train.global_batch_size:
        run.logger.message(f"train.global_batch_size changed from {saved_batch} to {run.cfg.train.global_batch_size}: "
                           f"the next step reads global samples from {position.sample_index} on")
    _set_aside_newer(run, found)
    _clear_pending(run)
    return position


def _load(run: Run, found: "checkpoint.Found") -> None:
    """The checkpoint's weights, optimizer state, RNG streams and spike window into this run, on any layout: each
    rank reads the slices its optimizer holds. On the layout that wrote it the RNG streams go on too (a bit-exact
    resume); on another they are reseeded."""
    saved, now = _layout_of(found.state), _layout_of(state_file.RunState(**_state_layout(run)))
    same = saved == {**now, "dtype": saved["dtype"] or now["dtype"]}
    has_slices, show = fragments.present(found.path), run.env.is_main and run.cfg.logging.progress
    settings = optim.group_settings(run.scheduler)  # as this run's config built them
    if not same:
        how = ("each rank reads its slices of the fp32 masters and Adam moments" if has_slices else
               "an older checkpoint without slices: every rank reads full fp32 weights and Adam moments")
        run.logger.message(f"checkpoint {found.path} is {_describe(saved)}, this run {_describe(now)}: {how}; "
                           "the dropout RNG streams do not follow a change of layout and are reseeded from "
                           "(seed, step, rank)")
    if has_slices:
        collective.load(run.engine, found, _slices(run), show_progress=show)
    elif same and not compat.vocab_padding_change(found.state, run.cfg.to_dict()["model"]):
        # saved before checkpoints carried slices: DeepSpeed's own shards, which hold the saved padding
        collective.load_deepspeed_shards(run.engine, found, run.env.rank, run.env.world_size)
    else:  # ... on another layout: ZeRO stages and data-parallel sizes only, through full tensors on every rank
        check_same_layout(found.state, run.layout, run.engine.zero_optimization_stage(), found.path)
        full = portable.read_full_state(found.path, saved["zero"], run.param_order)
        slices.load(run.engine, portable.FullState(full), run.layout, run.env.rank, run.cfg.model.num_layers,
                    run.cfg.model.family.tensor_plan, show_progress=show)
    optim.follow_config(run.scheduler, settings)
    _say_optim_changes(run, found)
    if same:
        collective.restore_rng(found, run.env.rank, run.env.world_size)
    else:
        seed_everything(run.cfg.train.seed + found.step, run.layout.seed_rank(run.env.rank))
    if run.spikes is not None and found.state.spike_detector:
        run.spikes.load_state_dict(found.state.spike_detector)
    elif run.spikes is not None:  # saved without train.spike: the window starts empty
        run.spikes.reset()


def _say_optim_changes(run: Run, found: "checkpoint.Found") -> None:
    changed = optim.changed_at_resume(found.state.config, run.cfg.to_dict())
    if changed:
        lr = run.scheduler.get_last_lr()[0]
        run.logger.message(f"this run's optimizer settings differ from {found.path}'s: {', '.join(changed)}; they "
                           f"apply from step {found.step + 1} on (lr {lr:.4g}, optim.lr × the schedule's factor there)")


def _slices(run: Run) -> "collective.Slices":
    return collective.Slices(run.layout, run.env.rank, run.cfg.model.num_layers, run.cfg.model.family.tensor_plan)


def _state_layout(run: Run) -> dict:
    """The part of megapile_state.json that says which layout wrote a checkpoint."""
    engine = run.engine
    dtype = "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32"
    return {"world_size": run.env.world_size, "zero_stage": engine.zero_optimization_stage(),
            "parallel": run.layout.as_dict(), "dtype": dtype}


def _layout_of(state: "state_file.RunState") -> dict:
    # dtype None: saved before checkpoints recorded it (the config may say "auto")
    return {"tensor": state.tensor, "pipeline": state.pipeline, "world": state.world_size, "zero": state.zero_stage,
            "dtype": state.dtype}


def _describe(layout: dict) -> str:
    data = layout["world"] // (layout["tensor"] * layout["pipeline"])
    return (f"tensor {layout['tensor']} × pipeline {layout['pipeline']} × data {data}, ZeRO-{layout['zero']}, "
            f"{layout['dtype'] or 'precision unrecorded'}")


def roll_back(run: Run, rollback: Rollback) -> Position:
    """Too many loss spikes (megapile/training/spikes.py): reload the newest intact checkpoint at least
    train.spike.rollback_steps before the first of them and go on with their global samples never trained.

    The range, the count of rollbacks and the chosen checkpoint ("pending") are written to CHECKPOINT_DIR/spikes.json
    before anything else, so a requeue before the next save skips the range too, and a kill anywhere inside the
    rollback leaves a restart that completes it (`_pending_rollback`) instead of resuming the newest checkpoint,
    which lies past the spikes, or spending a second rollback."""
    cfg = run.cfg.train.spike
    record = _spike_record(run.ckpt_dir)
    rollbacks = record["rollbacks"] + 1
    start, end = rollback.samples
    if rollbacks > cfg.max_rollbacks:
        raise TrainingError(f"step {rollback.first_step}: {rollback.reason}, after {cfg.max_rollbacks} rollbacks "
                            f"(train.spike.max_rollbacks); the spikes began at global samples [{start}, {end})")
    target = rollback.first_step - cfg.rollback_steps
    found, damaged = _rollback_target(run, target)
    if found is None:
        raise TrainingError(f"step {rollback.first_step}: {rollback.reason}, but {run.ckpt_dir} holds no "
                            f"{'intact ' if damaged else ''}checkpoint at or before step {target} to roll back to "
                            f"(train.spike.rollback_steps={cfg.rollback_steps}; checkpoint.every and "
                            "checkpoint.keep_every keep older ones)")
    skip = merge_ranges(record["skip_samples"], [[start, end]])
    if run.env.world_size > 1:
        torch.distributed.barrier()  # every rank has read the record before rank 0 changes it
    if run.env.is_main:
        _write_spike_record(run.ckpt_dir, {"skip_samples": skip, "rollbacks": rollbacks,
                                           "pending": {"path": found.path, "step": found.step}})
    _load(run, found)
    run.logger.message(f"step {rollback.first_step}: {rollback.reason}: rollback {rollbacks} of at most "
                       f"{cfg.max_rollbacks} to {found.path}; global samples [{start}, {end}) will not be trained")
    _set_aside_newer(run, found)
    _clear_pending(run)
    return Position.of_state(found.step, found.state, merge_ranges(run.cfg.train.skip_samples, skip))


def _rollback_target(run: Run, step: int) -> "tuple[checkpoint.Found | None, bool]":
    """The newest checkpoint at or before `step` that verifies (a damaged one is reported and the next older one
    tried), and whether any there was damaged. Rank 0 verifies and tells the others, so every rank loads the same."""
    choice: list = [None, False]
    if run.env.is_main:
        found = _newest_intact(run, step)
        older = [tag for s, tag in checkpoint.list_complete(run.ckpt_dir) if s <= step]
        choice = [found.path if found else None, bool(older) and found is None]
    if run.env.world_size > 1:
        torch.distributed.broadcast_object_list(choice, src=0)
    if choice[0] is None:
        return None, choice[1]
    return (found if run.env.is_main else checkpoint.open_checkpoint(choice[0], checksums=False)), False


def _newest_intact(run: Run, step: int) -> "checkpoint.Found | None":
    return checkpoint.find_resumable(run.ckpt_dir, run.cfg.checkpoint.verify == "checksum", at_most=step,
                                     warn=lambda text: run.logger.message(f"{text}; rolling back further"))


def _pending_rollback(run: Run) -> "checkpoint.Found | None":
    """A rollback that a kill interrupted (spikes.json still names its target): the restart resumes that target,
    or an older intact checkpoint if it has since been damaged, never the newest past the spikes. Rank 0 only."""
    pending = _spike_record(run.ckpt_dir).get("pending")
    if pending is None:
        return None
    found = _newest_intact(run, pending["step"])
    if found is None:
        raise ConfigError(f"checkpoint.resume: {SPIKE_FILE} in {run.ckpt_dir} asks to complete a rollback to "
                          f"{pending['path']}, but no intact checkpoint at or before step {pending['step']} remains")
    run.logger.message(f"completing the loss-spike rollback to {pending['path']} that was interrupted: "
                       f"resuming {found.path}, not the newest checkpoint")
    return found


def _clear_pending(run: Run) -> None:
    """The rollback is complete (target loaded, newer checkpoints set aside), or a fresh start abandoned it: a
    restart resumes as usual."""
    if not run.env.is_main:
        return
    record = _spike_record(run.ckpt_dir)
    if "pending" in record:
        _write_spike_record(run.ckpt_dir, {k: v for k, v in record.items() if k != "pending"})


def _spike_record(ckpt_dir: str) -> dict:
    """What rollbacks decided in this checkpoint directory: {"skip_samples": ranges, "rollbacks": n}."""
    try:
        with open(os.path.join(ckpt_dir, SPIKE_FILE)) as f:
            return json.load(f)
    except FileNotFoundError:
        return {"skip_samples": [], "rollbacks": 0}


def _write_spike_record(ckpt_dir: str, record: dict) -> None:
    path = os.path.join(ckpt_dir, SPIKE_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    manifest.fsync_dir(ckpt_dir)  # the rename itself survives a crash, as `latest`'s does


def _choose(run: Run) -> "checkpoint.Found | None":
    """The checkpoint to resume: rank 0 finds and verifies it (checksums, fallback to an older good one) and tells
    the others, which then read only its state file; a refusal is the same one-line error on every rank."""
    choice: list = [None]
    if run.env.is_main:
        try:
            found = _find(run)
            choice = [found.path if found else None]
        except ConfigError as e:
            choice = [e]
    if run.env.world_size > 1:
        torch.distributed.broadcast_object_list(choice, src=0)
    if isinstance(choice[0], ConfigError):
        raise choice[0]
    if choice[0] is None:
        return None
    return found if run.env.is_main else checkpoint.open_checkpoint(choice[0], checksums=False)


def _find(run: Run) -> "checkpoint.Found | None":
    cfg = run.cfg.checkpoint
    if cfg.resume == "none":
        return None
    pending = _pending_rollback(run)  # before any other choice: the newest checkpoint lies past the spikes
    if pending is not None:
        return pending
    checksums = cfg.verify == "checksum"
    warn = run.logger.message
    if cfg.resume == "auto":
        return checkpoint.find_resumable(run.ckpt_dir, checksums, warn=warn)
    if _already_rolled_back(run.ckpt_dir, cfg.resume):  # a restart after the rollback: keep the new branch
        found = checkpoint.find_resumable(run.ckpt_dir, checksums, warn=warn) or \
            checkpoint.open_checkpoint(cfg.resume, checksums)
        run.logger.message(f"checkpoint.resume: {cfg.resume} was rolled back to already; resuming this branch's "
                           f"newest checkpoint {found.path}")
        return found
    return checkpoint.open_checkpoint(cfg.resume, checksums)


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


def save(run: Run, position: Position, must_succeed: bool = False) -> None:
    """Checkpoint `position`. A failed save raises when `must_succeed` (last step, stop signal) or when
    checkpoint.on_save_error is "stop"; otherwise it is reported and training goes on.

    With checkpoint.async a periodic save is snapshotted here and written in the background (`poll` commits it at
    a later step); a save that must succeed first waits for the one in flight, then saves synchronously: the
    exit that follows promises a checkpoint of this very step."""
    cfg, step = run.cfg, position.step
    finish(run, why=f"the save of step {step}")
    if any_rank([not _weights_finite(run.engine)], run.env.world_size)[0]:
        raise TrainingError(f"step {step}: the weights contain NaN or Inf; refusing to save a checkpoint over good ones")
    slices, show = _slices(run), cfg.logging.progress
    try:
        if run.background is not None and not must_succeed:
            begun = time.perf_counter()
            staged = collective.stage(run.engine, run.ckpt_dir, step, _state(run, position), run.env.is_main, slices,
                                      run.tokenizer_files, run.background.buffers)
            run.background.start(staged, step, time.perf_counter() - begun)
            return
        figures = collective.save(run.engine, run.ckpt_dir, step, _state(run, position), cfg.checkpoint,
                                  run.env.is_main, slices, files=run.tokenizer_files, show_progress=show)
    except checkpoint.CheckpointError as e:
        _save_failed(run, e, must_succeed)
        return
    if figures:
        run.logger.message(f"saved checkpoint {run.ckpt_dir}/global_step{step}: {figures['save_mb']:.1f} MB in "
                           f"{figures['save_seconds']:.2f} s ({figures['save_mb_per_s']:.0f} MB/s)")


def poll(run: Run) -> bool:
    """Once per step with checkpoint.async: commit the save in flight if every rank has written its part."""
    if run.background is not None and run.background.in_flight and run.background.ready():
        _commit(run)
        return True
    return False


def finish(run: Run, why: str) -> None:
    """Wait for the asynchronous save in flight, if any, commit it and let its pruning end (before a save, the
    end of training, a stop or a rollback act). A wait for a write is logged and counted."""
    background = run.background
    if background is None:
        return
    if not background.in_flight:
        background.join_pruner()  # no rmtree beside a save's own pruning or a rollback's moves
        return
    waited = background.wait()
    if waited is not None:
        run.logger.message(f"{why} waits {waited:.2f} s for the checkpoint of step {background.step} to finish "
                           f"writing in the background (wait {background.waits}, {background.waited_seconds:.2f} s "
                           "in all; a larger checkpoint.every or faster storage avoids them)")
    _commit(run)  # every rank has waited for its own write: the commit's collectives find all of them done
    background.join_pruner()


def _commit(run: Run) -> None:
    staged, written = run.background.take()
    try:
        figures = collective.commit(staged, written, run.cfg.checkpoint, run.env.is_main, prune_now=False)
    except checkpoint.CheckpointError as e:
        _save_failed(run, e, must_succeed=False)
        return
    if run.env.is_main:
        run.background.prune(run.ckpt_dir, run.cfg.checkpoint)
    if figures:
        run.logger.message(f"saved checkpoint {staged.final}: {figures['save_mb']:.1f} MB, training blocked "
                           f"{run.background.snapshot_seconds:.2f} s by the snapshot, written in the background and "
                           f"committed {figures['save_seconds']:.2f} s after it")


def _save_failed(run: Run, error: "checkpoint.CheckpointError", must_succeed: bool) -> None:
    if must_succeed or run.cfg.checkpoint.on_save_error == "stop":
        raise TrainingError(str(error)) from None
    run.logger.message(f"error: {error}; training continues (checkpoint.on_save_error=continue)")


def _state(run: Run, position: Position) -> dict:
    """megapile_state.json: its format, where training stands, the layout that wrote it, and what it was trained
    on (megapile/checkpoint/state_file.py reads it back)."""
    return state_file.write_form({
        "step": position.step,
        "sample_index": position.sample_index,
        "tokens_seen": position.tokens_seen,
        **_state_layout(run),  # world_size, zero_stage, parallel, dtype
        "config": run.cfg.to_dict(),
        "fingerprints": run.fingerprints,
        "skip_samples": position.skip_samples,  # global sample ranges never trained (data state)
        **({"spike_detector": run.spikes.state_dict()} if run.spikes is not None else {}),
        "param_order": run.param_order,  # how a ZeRO-0 optimizer numbers (and bf16/fp16 flattens) the parameters
        "versions": {"megapile": megapile.__version__, "deepspeed": deepspeed.__version__, "torch": torch.__version__},
    })


def _weights_finite(engine) -> bool:
    """This rank's share of the weights (ZeRO-3 keeps a partition in ds_tensor) is all finite."""
    return all(bool(torch.isfinite(getattr(p, "ds_tensor", p)).all()) for p in engine.module.parameters())
