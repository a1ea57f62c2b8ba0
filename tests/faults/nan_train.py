"""megapile/train.py with a NaN injected into the training loss of chosen steps on rank 0 (with pipeline
parallelism: on the last stage), and reports read by the tests (a test harness, not product code).

    MEGAPILE_NAN_STEPS="3,4"   1-based optimizer steps, counted from the run's start (a resumed run too); may be empty
    MEGAPILE_REPLICAS=1        at the end, print a digest of the parameters this rank holds whole and that other
                               ranks hold too (not ZeRO-3 partitions, not tensor-parallel slices)
    MEGAPILE_SPIKE_SAMPLES="a-b"  a loss spike: every rank multiplies the training loss by MEGAPILE_SPIKE_FACTOR
                               (default 30) in each step whose global batch overlaps samples [a, b) (a stand-in
                               for a poisoned stretch of data); several ranges joined by commas
    MEGAPILE_EXIT_AFTER_ROLLBACK=1  die (exit 9, no clean-up) right after a loss-spike rollback, before any save
    MEGAPILE_KILL_IN_ROLLBACK=stage  rank 0 SIGKILLs itself inside the first loss-spike rollback (manager.roll_back),
                               a moment defined by progress: "before-record" (spikes.json not yet written),
                               "recorded" (written, target not loaded), "loaded" (newer checkpoints not yet set
                               aside), "set-aside" (moved, the rollback not yet marked complete)
    MEGAPILE_DAMAGE_BEFORE_ROLLBACK=global_stepN  rank 0 flips a byte of each slice file of that checkpoint just
                               before the first loss-spike rollback (bit rot that checkpoint.verify=checksum finds)
    MEGAPILE_SIGTERM_AT_STEP=N  rank 0 sends itself SIGTERM just before step N trains (a stop scheduled by progress)
    MEGAPILE_SLOW_RANK=r       a straggler: rank r's every training forward pass sleeps twice its own compute time
    MEGAPILE_KILL_IN_SAVE=stage:n:r  rank r SIGKILLs itself inside the n-th save of this process (checkpoint.async),
                               a moment defined by progress: "snapshot" (the .tmp folder made and the slices copied,
                               nothing written), "write" (in the background thread: the slices written, not
                               sealed), "written" (every write done, the commit not begun), "commit" (the manifest
                               written, the folder not yet renamed: rank 0 only)
    MEGAPILE_HOLD_WRITE=1      checkpoint.async's background write of each save waits until the training thread
                               waits for it (the next save, the end, a stop or a rollback): every save finds the
                               previous one still writing, whatever the machine's speed
    MEGAPILE_LATE_SNAPSHOT=1   checkpoint.async's deferred copy of the slices waits until the training thread needs
                               it (its next optimizer step, or the end of the save): the latest moment it may happen

For each NaN or spike step, every rank prints whether its weights came out of the step exactly as they went in.
"""
import hashlib
import os
import signal
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from megapile import model, train  # noqa: E402
from megapile.checkpoint import background, collective, fragments, manager, manifest  # noqa: E402
from megapile.parallel import pipeline  # noqa: E402
from megapile.runtime.process_exit import exit_now  # noqa: E402

NAN_STEPS = {int(s) for s in os.environ.get("MEGAPILE_NAN_STEPS", "").split(",") if s}
SPIKES = [tuple(int(v) for v in r.split("-")) for r in os.environ.get("MEGAPILE_SPIKE_SAMPLES", "").split(",") if r]
SPIKE_FACTOR = float(os.environ.get("MEGAPILE_SPIKE_FACTOR", "30"))
RANK = os.environ.get("RANK", "0")
_step = [0]  # the 1-based step being trained, set before its micro-batches run
_batch = [(0, 0)]  # the global samples [start, end) of that step


def _spiking() -> bool:
    start, end = _batch[0]
    return any(start < b and end > a for a, b in SPIKES)


def _poisoned(loss: torch.Tensor) -> torch.Tensor:
    return loss * float("nan") if _step[0] in NAN_STEPS else loss


def _spiked(loss: torch.Tensor) -> torch.Tensor:
    return loss * SPIKE_FACTOR if _spiking() else loss


_original_forward = model.GPT.forward


SLOW_RANK = os.environ.get("MEGAPILE_SLOW_RANK")


def forward(self, input_ids, targets=None):
    start = time.perf_counter()
    out = _original_forward(self, input_ids, targets)
    if targets is not None and self.training:
        out = _spiked(_poisoned(out) if RANK == "0" else out)
        if RANK == SLOW_RANK:  # a straggler: each forward pass takes 3× its own time, whatever the machine's speed
            time.sleep(2 * (time.perf_counter() - start))
    return out


_original_lm_loss = pipeline.lm_loss


def lm_loss(logits, targets):
    """The pipeline's loss (last stage): NaN on every micro-batch of the chosen steps; evaluation is left alone."""
    out = _original_lm_loss(logits, targets)
    return _spiked(_poisoned(out)) if torch.is_grad_enabled() else out


def _local_weights(engine):
    return [getattr(p, "ds_tensor", p).detach().clone() for p in engine.module.parameters()]


def _say(line: str) -> None:
    """One write per line: the ranks share one stdout pipe, and print() may split text and newline."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


_original_step = train.train_step


def train_step(run, first_sample):
    """Report whether a step with an injected NaN left this rank's weights exactly as they were."""
    _step[0] = first_sample // run.cfg.train.global_batch_size + 1  # the batch size is fixed in these runs
    _batch[0] = (first_sample, first_sample + run.cfg.train.global_batch_size)
    if RANK == "0" and os.environ.get("MEGAPILE_SIGTERM_AT_STEP") == str(_step[0]):
        os.kill(os.getpid(), signal.SIGTERM)  # megapile's handler only raises the stop flag
    before = _local_weights(run.engine) if _step[0] in NAN_STEPS or _spiking() else None
    out = _original_step(run, first_sample)
    if before is not None:
        same = all(torch.equal(a, b) for a, b in zip(before, _local_weights(run.engine)))
        _say(f"rank {RANK} step {_step[0]} weights unchanged: {same}")
    return out


_original_roll_back = manager.roll_back
_rolling = [0]  # how many rollbacks have begun in this process
KILL_IN_ROLLBACK = os.environ.get("MEGAPILE_KILL_IN_ROLLBACK", "")


def _die_at(stage):
    if _rolling[0] == 1 and KILL_IN_ROLLBACK == stage and RANK == "0":
        _say(f"rank 0 killed in the rollback at {stage}")
        os.kill(os.getpid(), signal.SIGKILL)  # no handler, no clean-up


def _hook(name, before=None, after=None):
    """Wrap manager.`name` (called by roll_back through the module's globals) with kills before or after it."""
    original = getattr(manager, name)

    def hooked(*args, **kwargs):
        if before:
            _die_at(before)
        out = original(*args, **kwargs)
        if after:
            _die_at(after)
        return out
    setattr(manager, name, hooked)


def _damage(run, tag):
    """Flip one byte in the middle of every slice file of checkpoint `tag`; the manifest keeps the old CRCs."""
    portable = os.path.join(run.ckpt_dir, tag, "portable")
    for name in sorted(os.listdir(portable)):
        path = os.path.join(portable, name)
        if os.path.isfile(path) and not name.endswith(".json"):
            with open(path, "r+b") as f:
                f.seek(os.path.getsize(path) // 2)
                byte = f.read(1)
                f.seek(-1, os.SEEK_CUR)
                f.write(bytes([byte[0] ^ 0xFF]))


def roll_back(run, rollback):
    _rolling[0] += 1
    damaged = os.environ.get("MEGAPILE_DAMAGE_BEFORE_ROLLBACK")
    if damaged and _rolling[0] == 1 and RANK == "0":
        _damage(run, damaged)
    position = _original_roll_back(run, rollback)
    _say(f"rank {RANK} rolled back to step {position.step}, skipping {position.skip_samples}")
    if os.environ.get("MEGAPILE_EXIT_AFTER_ROLLBACK") == "1":
        os._exit(9)  # a kill before the next save: the requeue must still step over the range
    return position


_original_loop = train.loop


def loop(run, start, stop):
    summary = _original_loop(run, start, stop)
    if os.environ.get("MEGAPILE_REPLICAS") == "1":
        digest = hashlib.sha256()
        names = []
        for name, p in sorted(run.engine.module.named_parameters()):
            if hasattr(p, "ds_tensor") or (run.layout.tensor > 1 and run.cfg.model.family.tensor_plan.split_dim(name) is not None):
                continue
            digest.update(p.detach().float().contiguous().numpy().tobytes())
            names.append(name)
        _say(f"rank {RANK} replicas {len(names)} {digest.hexdigest()}")
    return summary


KILL_IN_SAVE = os.environ.get("MEGAPILE_KILL_IN_SAVE", "::").split(":")
_saves = {}  # calls so far of each hooked save stage in this process


def _hook_save(module, name, stage, before=False):
    """Kill this rank at the n-th call of module.`name` (before or after it) when MEGAPILE_KILL_IN_SAVE names `stage`."""
    original = getattr(module, name)
    kill_stage, nth, rank = KILL_IN_SAVE

    def die():
        if kill_stage == stage and RANK == rank and _saves.setdefault(stage, 0) == int(nth):
            _say(f"rank {RANK} killed in save {nth} at {stage}")
            os.kill(os.getpid(), signal.SIGKILL)  # no handler, no clean-up (from the writer thread too)

    def hooked(*args, **kwargs):
        _saves[stage] = _saves.get(stage, 0) + (1 if before else 0)
        if before:
            die()
        out = original(*args, **kwargs)
        if not before:
            _saves[stage] = _saves.get(stage, 0) + 1
            die()
        return out
    setattr(module, name, hooked)


model.GPT.forward = forward
pipeline.lm_loss = lm_loss
train.train_step = train_step
train.loop = loop
manager.roll_back = roll_back
_hook("_write_spike_record", before="before-record", after="recorded")  # its first call writes the decision
_hook("_load", after="loaded")
_hook("_set_aside_newer", after="set-aside")
def _late_snapshot():
    """Hold each deferred copy until the training thread waits for it: if the optimizer's step did not wait, it
    would change the masters and moments before they are copied, and the checkpoint would hold the next step's."""
    asked = threading.Event()
    fill, start = fragments.Buffers.fill, background.Background.start
    wait_copied, wait = background.Background.wait_copied, background.Background.wait

    def late_fill(self):
        if self._pending:
            asked.wait(timeout=30)  # a bound for a missing wait, which then fails the test on the bytes written
        fill(self)

    def starting(self, *args):
        asked.clear()  # this step's own optimizer step came before the save
        start(self, *args)

    def asking(self):
        asked.set()
        return wait_copied(self)

    def asking_wait(self):
        asked.set()
        return wait(self)

    fragments.Buffers.fill = late_fill
    background.Background.start = starting
    background.Background.wait_copied = asking
    background.Background.wait = asking_wait


def _hold_write():
    """Each background write starts only once the training thread waits for it (Background.wait)."""
    asked = threading.Event()
    write, wait = collective.write, background.Background.wait

    def held(staged, *args):
        if threading.current_thread() is not threading.main_thread():  # not a synchronous save's own write
            asked.wait(timeout=120)  # a bound for a hang: the training thread always waits for it in the end
            asked.clear()
        return write(staged, *args)

    def asking_wait(self):
        asked.set()
        return wait(self)

    collective.write = held
    background.Background.wait = asking_wait


if os.environ.get("MEGAPILE_LATE_SNAPSHOT") == "1":
    _late_snapshot()
if os.environ.get("MEGAPILE_HOLD_WRITE") == "1":
    _hold_write()
_hook_save(fragments, "collect", "snapshot")
_hook_save(fragments, "write_files", "write")
_hook_save(collective, "commit", "written", before=True)
_hook_save(manifest, "write_entries", "commit")
exit_now(train.main())  # as megapile/train.py ends
