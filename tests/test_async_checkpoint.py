"""Asynchronous checkpoints (checkpoint.async, megapile/checkpoint/background.py) against synchronous ones.

One 2-rank ZeRO-1 bf16 run with dropout, saving every 2 steps, is trained twice, with checkpoint.async off and on:
the losses are the same bit for bit and so are the checkpoints' files (slices, index, state but for the key
itself): the snapshot is the state of the save step, whatever training does while it is written, even with each
snapshot's copy held back until the next optimizer step asks for it (tests/faults/nan_train.py
MEGAPILE_LATE_SNAPSHOT). A resume of an
asynchronous checkpoint goes on bit for bit; `megapile ckpt verify` passes it.

The kill campaign on the asynchronous path (tests/faults/nan_train.py MEGAPILE_KILL_IN_SAVE): one start killed at
each moment of a background save, in turn (snapshot, write in the background thread, every write done but not
committed, inside the commit), each scheduled by progress (the n-th save of the start); restarting the same command
each time ends with the uninterrupted run's losses and weights. Also: a stop signal while a save is in flight,
the host-memory refusal, and a failed background write reported at the commit with checkpoint.on_save_error.
"""
import json
import os
import re

import pytest
import torch
from faults.campaign import HARNESS, Report
from harness import run_ranks
from train_helpers import losses, read_metrics, small_run_overrides

from megapile.checkpoint import background, find_resumable
from megapile.checkpoint.portable import read_full_weights

EVERY, STEPS = 2, 12
SETTINGS = dict(train__dtype="bf16", model__dropout=0.1, parallel__zero_stage=1, train__max_steps=STEPS,
                optim__decay_steps=STEPS, checkpoint__every=EVERY, checkpoint__keep_last=20, train__eval_every=0)
STAGES = ("snapshot", "write", "written", "commit")


def _run(run_dir, preprocessed, tokenizer_path, env=None, check=True, **extra):
    overrides = small_run_overrides(preprocessed, tokenizer_path, run_dir, **{**SETTINGS, **extra})
    return run_ranks("ranks", 2, [HARNESS] + overrides, run_dir + "-logs", check=check, env=env)


def _files(ckpt: str) -> dict:
    out = {}
    for root, _, names in os.walk(ckpt):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), ckpt)
            with open(os.path.join(root, name), "rb") as f:
                out[rel] = f.read()
    state = json.loads(out.pop("megapile_state.json"))
    state["config"]["checkpoint"].pop("async")
    state["config"]["logging"].pop("run_dir")
    out.pop("manifest.json")  # its CRCs of the state file differ with the key; the other files are compared
    return {**out, "state": state}


@pytest.fixture(scope="module")
def straight(tmp_path_factory, preprocessed, tokenizer_path):
    """The uninterrupted runs: {False: synchronous, True: asynchronous} run directories, "output": the latter's."""
    dirs = {}
    for mode in (False, True):
        dirs[mode] = str(tmp_path_factory.mktemp("async" if mode else "sync") / "run")
        # the deferred copy of each snapshot as late as it may be: inside the next step, before its optimizer step
        dirs["output"] = _run(dirs[mode], preprocessed, tokenizer_path, checkpoint__async=mode,
                              env={"MEGAPILE_LATE_SNAPSHOT": "1"} if mode else None).stdout
    return dirs


@pytest.mark.slow
def test_async_saves_equal_synchronous_ones(straight, tmp_path, preprocessed, tokenizer_path):
    sync, asynchronous = straight[False], straight[True]
    assert losses(asynchronous) == losses(sync)
    for step in range(EVERY, STEPS + 1, EVERY):
        a, s = (_files(os.path.join(d, "checkpoints", f"global_step{step}")) for d in (asynchronous, sync))
        assert a.keys() == s.keys()
        assert all(a[k] == s[k] for k in a), [k for k in a if a[k] != s[k]]
    out = straight["output"]
    assert re.search(r"saved checkpoint \S+global_step2: [\d.]+ MB, training blocked [\d.]+ s by the snapshot", out)
    assert not any(name.endswith(".tmp") for name in os.listdir(os.path.join(asynchronous, "checkpoints")))

    resumed = str(tmp_path / "resumed")
    _run(resumed, preprocessed, tokenizer_path, checkpoint__async=True,
         checkpoint__resume=os.path.join(asynchronous, "checkpoints", "global_step6"))
    assert [r["step"] for r in read_metrics(resumed)] == list(range(7, STEPS + 1))
    assert losses(resumed) == losses(sync)[6:]
    verify = run_ranks("python", 1, ["-m", "megapile.cli", "ckpt", "verify", os.path.join(asynchronous, "checkpoints")],
                       tmp_path / "verify")
    assert sorted(verify.stdout.split()) == sorted(f"global_step{s}: ok".split()[0] for s in range(EVERY, STEPS + 1, EVERY)
                                                   ) + ["ok"] * (STEPS // EVERY), verify.stdout


@pytest.mark.slow
def test_kills_at_every_moment_of_a_background_save(straight, tmp_path, preprocessed, tokenizer_path, capsys):
    """Kill campaign on the asynchronous path: each start is killed in its 2nd save (the 1st is committed), at the
    next moment in turn, by rank 1 or 0 alternately (the commit's manifest is rank 0's)."""
    run_dir, report = str(tmp_path / "faulty"), Report()
    victims = {"snapshot": 1, "write": 0, "written": 1, "commit": 0}
    for stage in STAGES:
        before = max((s for s in _steps(run_dir)), default=0)
        proc = _run(run_dir, preprocessed, tokenizer_path, check=False, checkpoint__async=True,
                    env={"MEGAPILE_KILL_IN_SAVE": f"{stage}:2:{victims[stage]}"})
        assert proc.returncode != 0 and f"killed in save 2 at {stage}" in proc.stdout, proc.stdout[-3000:]
        report.injected += 1
        report.kinds[stage] = 1
        logged = max(r["step"] for r in read_metrics(run_dir))
        # the 2nd save's step is never resumed: it was not committed (not even by the commit's kill, before the rename)
        assert max(_steps(run_dir)) == before + EVERY, (stage, _steps(run_dir))
        assert not os.path.exists(os.path.join(run_dir, "checkpoints", f"global_step{before + 2 * EVERY}"))
        report.steps_lost += logged - (before + EVERY)
    finished = _run(run_dir, preprocessed, tokenizer_path, checkpoint__async=True)
    assert f"resumed from {os.path.join(run_dir, 'checkpoints', f'global_step{4 * EVERY}')}" in finished.stdout
    report.survived = report.restarts = report.injected
    with capsys.disabled():
        print("\n" + report.line())
    assert losses(run_dir)[-STEPS:] == losses(straight[True])  # every step once, bit-identical
    expected, actual = (_final_weights(d) for d in (straight[True], run_dir))
    assert expected.keys() == actual.keys() and all(torch.equal(actual[k], expected[k]) for k in expected)


@pytest.mark.slow
def test_a_stop_waits_for_the_save_in_flight(tmp_path, preprocessed, tokenizer_path):
    """SIGTERM before step 4 trains: every rank stops after step 5 (the stop flag is exchanged a step late), whose
    save waits for step 4's in flight to commit, then saves synchronously; exit 75 promises step 5."""
    run_dir = str(tmp_path / "run")
    proc = _run(run_dir, preprocessed, tokenizer_path, check=False, checkpoint__async=True,
                env={"MEGAPILE_SIGTERM_AT_STEP": "4"})
    assert proc.returncode == 75, proc.stdout[-3000:]
    assert _steps(run_dir) == [5, 4, 2]
    four = re.search(r"saved checkpoint \S+global_step4: .*training blocked", proc.stdout)
    five = re.search(r"saved checkpoint \S+global_step5: [\d.]+ MB in", proc.stdout)
    assert four and five and four.start() < five.start(), proc.stdout[-3000:]


@pytest.mark.slow
def test_a_save_that_finds_the_previous_one_writing_waits_for_it(straight, tmp_path, preprocessed, tokenizer_path):
    """Each background write held until the training thread waits for it (MEGAPILE_HOLD_WRITE): the save of step 4
    finds step 2's still writing and waits, the last step 6 finds step 4's; both waits logged and counted
    (`save_waits` in the metrics, the logged line's running count), every checkpoint complete, the losses the
    synchronous run's."""
    run_dir = str(tmp_path / "run")
    proc = _run(run_dir, preprocessed, tokenizer_path, checkpoint__async=True, train__max_steps=6,
                optim__decay_steps=STEPS, env={"MEGAPILE_HOLD_WRITE": "1"})
    for save, previous, n in ((4, 2, 1), (6, 4, 2)):
        assert re.search(rf"the save of step {save} waits [\d.]+ s for the checkpoint of step {previous} to finish "
                         rf"writing in the background \(wait {n}, ", proc.stdout), proc.stdout[-3000:]
    # counted in each record as of its step (a record comes before its step's save): step 4's wait from step 5 on
    assert [r["save_waits"] for r in read_metrics(run_dir)] == [0, 0, 0, 0, 1, 1]
    assert _steps(run_dir) == [6, 4, 2]
    assert losses(run_dir) == losses(straight[False])[:6]


def _steps(run_dir):
    found = []
    ckpts = os.path.join(run_dir, "checkpoints")
    for name in os.listdir(ckpts) if os.path.isdir(ckpts) else []:
        if (m := re.match(r"^global_step(\d+)$", name)):
            found.append(int(m.group(1)))
    return sorted(found, reverse=True)


def _final_weights(run_dir):
    found = find_resumable(os.path.join(run_dir, "checkpoints"))
    assert found.step == STEPS
    return read_full_weights(found.path, found.state.zero_stage)


class _Replica:
    """A one-rank ZeRO-0 optimizer as `fragments.collect` sees it: its values are the live tensors."""

    replicated = True

    def __init__(self, values):
        self.values = values

    def span(self, h):
        return 0, h.numel

    def get(self, h, kind):
        return self.values[h.name, kind]


def test_a_snapshot_is_a_copy_that_training_cannot_change(tmp_path):
    """What the background thread writes is the values at the snapshot, however the optimizer changes them after;
    the next snapshot reuses the same buffers."""
    from megapile.checkpoint.fragments import DIR, KINDS, Buffers, Stored, collect, write_files, write_index
    from megapile.checkpoint.slices import Held
    from megapile.parallel.layout import Layout

    live = {("w", kind): torch.arange(12, dtype=torch.float32) + i for i, kind in enumerate(KINDS)}
    held = [Held("w", torch.nn.Parameter(torch.zeros(3, 4)), (3, 4), None, 0, 1, True)]
    buffers = Buffers()
    pieces, params, files = collect(_Replica(live), held, Layout(1, 1, 1, 1), 0, buffers)
    first = {k: v.data_ptr() for k, v in buffers.tensors.items()}
    for value in live.values():
        value.mul_(-1)  # the next optimizer step, while the snapshot is being written
    write_files(str(tmp_path), files)
    write_index(str(tmp_path), [(pieces, params)], 1, None, {"tensor": 1})
    stored = Stored(str(tmp_path))
    for i, kind in enumerate(KINDS):
        assert torch.equal(stored.full("w", kind).reshape(-1), torch.arange(12, dtype=torch.float32) + i)
    assert buffers.nbytes == 3 * 12 * 4
    collect(_Replica(live), held, Layout(1, 1, 1, 1), 0, buffers)
    assert {k: v.data_ptr() for k, v in buffers.tensors.items()} == first  # the same memory, refilled
    assert torch.equal(buffers.tensors["fp32/w/0/0"], -torch.arange(12, dtype=torch.float32))
    assert os.path.isdir(tmp_path / DIR)

    # deferred (checkpoint.async on CPU): nothing is copied until `fill`, the writer thread's first act, which the
    # optimizer's next step waits for; what it copies is then safe from that step
    deferred = Buffers(defer_cpu=True)
    _, _, files = collect(_Replica(live), held, Layout(1, 1, 1, 1), 0, deferred)
    assert deferred._pending and not torch.equal(files[0][1]["fp32/w/0/0"], live["w", "fp32"])
    deferred.fill()
    expected = live["w", "fp32"].clone()
    live["w", "fp32"].add_(100)
    assert torch.equal(files[0][1]["fp32/w/0/0"], expected) and not deferred._pending


def test_the_snapshot_must_fit_in_host_memory():
    assert background.refusal(10**9, 2, 8 * 10**9) is None
    line = background.refusal(4 * 10**9, 2, 8 * 10**9)
    assert line.startswith("checkpoint.async: the snapshot") and "\n" not in line
    assert "8.00 GB" in line and "checkpoint.async=false" in line
