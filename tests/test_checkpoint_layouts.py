"""Any checkpoint resumes on any layout: written under each source layout, resumed under each target layout.

    sources  TP2 (ZeRO-1), PP2 (ZeRO-0), TP2 × PP2 (ZeRO-1, 4 ranks), ZeRO-1, ZeRO-2, ZeRO-3 (2 ranks), bf16 ZeRO-0
    targets  1 rank ZeRO-0, 2 ranks ZeRO-3, TP2 (ZeRO-1), PP2 (ZeRO-0; ZeRO-1 in bf16, which megapile's pipelines need)

Each source trains steps 1-5 straight, saving at steps 3 and 5 (dropout 0, so every layout computes the same
numbers up to summation order). Each target resumes the source's step-3 checkpoint, trains steps 4-5 and saves.
Checked: the target's losses at steps 4 and 5 equal the source's (1e-5 relative in fp32; bf16 rounds differently
per layout, 1e-2; bit for bit where the target is the source's own layout, which loads DeepSpeed's shards), and
its step-5 fp32 masters and Adam moments, read back by parameter name, equal the source's: each tensor within 1e-3
relative (L2) in fp32, 2e-2 in bf16, where the masters are compared over the whole model (a bf16 step moves a
weight by ±lr wherever its gradient's sign is marginal). Moments restarted at the resume would be 11-87 % off
(exp_avg_sq keeps 0.95² of its step-3 value). A bf16 source resumes in bf16.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from megapile.checkpoint import manifest
from megapile.checkpoint.collective import _writer
from megapile.checkpoint.fragments import DIR, KINDS, Piece, Stored, write_index
from train_helpers import ROOT, TRAIN, free_port, read_metrics, small_run_overrides

COMMON = dict(train__max_steps=5, checkpoint__every=3, train__eval_every=100, optim__decay_steps=5,
              model__dropout=0.0, model__pad_vocab_multiple=512, parallel__overlap_comm=False)
SOURCES = {  # name: (ranks, overrides)
    "tp2": (2, {"parallel__zero_stage": 1, "parallel__tensor": 2}),
    "pp2": (2, {"parallel__zero_stage": 0, "parallel__pipeline": 2}),
    "tp2pp2": (4, {"parallel__zero_stage": 1, "parallel__tensor": 2, "parallel__pipeline": 2}),
    "zero1": (2, {"parallel__zero_stage": 1}),
    "zero2": (2, {"parallel__zero_stage": 2}),
    "zero3": (2, {"parallel__zero_stage": 3}),
    "bf16-zero0": (2, {"parallel__zero_stage": 0, "train__dtype": "bf16"}),
}
TARGETS = {
    "one-zero0": (1, {"parallel__zero_stage": 0}),
    "zero3": (2, {"parallel__zero_stage": 3}),
    "tp2": (2, {"parallel__zero_stage": 1, "parallel__tensor": 2}),
    "pp2": (2, {"parallel__zero_stage": 0, "parallel__pipeline": 2}),
}


def _train(run_dir: str, ranks: int, overrides: dict, preprocessed: dict, tokenizer_path: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
           "--master_port", str(free_port()), TRAIN] + \
        small_run_overrides(preprocessed, tokenizer_path, run_dir, **{**COMMON, **overrides})
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{run_dir}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def sources(tmp_path_factory, preprocessed, tokenizer_path):
    """Each source's straight run, trained on first use: {name: run directory}."""
    done = {}

    def get(name: str) -> str:
        if name not in done:
            run_dir = str(tmp_path_factory.mktemp(f"source-{name}"))
            ranks, overrides = SOURCES[name]
            _train(run_dir, ranks, overrides, preprocessed, tokenizer_path)
            done[name] = run_dir
        return done[name]
    return get


def _state(run_dir: str, step: int) -> Stored:
    return Stored(os.path.join(run_dir, "checkpoints", f"global_step{step}"))


CASES = [(s, t) for s in SOURCES for t in TARGETS]


@pytest.mark.slow
@pytest.mark.parametrize("source,target", CASES, ids=[f"{s}-to-{t}" for s, t in CASES])
def test_resume_on_another_layout(source, target, sources, tmp_path, preprocessed, tokenizer_path):
    straight = sources(source)
    ranks, overrides = TARGETS[target]
    bf16 = SOURCES[source][1].get("train__dtype") == "bf16"
    if bf16:
        overrides = {**overrides, "train__dtype": "bf16"}
        if target == "pp2":
            overrides["parallel__zero_stage"] = 1
    resumed = str(tmp_path / "resumed")
    step3 = os.path.join(straight, "checkpoints", "global_step3")
    out = _train(resumed, ranks, {**overrides, "checkpoint__resume": step3}, preprocessed, tokenizer_path)
    same = SOURCES[source][1] == TARGETS[target][1]  # DeepSpeed's own shards, bit for bit
    assert ("resumed from" if same else "each rank reads its slices of the fp32 masters and Adam moments") in out, \
        out[-3000:]

    mine, theirs = read_metrics(resumed), read_metrics(straight)
    assert [r["step"] for r in mine] == [4, 5]
    rel = 0 if same else 1e-2 if bf16 else 1e-5
    for a, b in zip(mine, theirs[3:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=rel), (source, target, a["loss"], b["loss"])

    # the step-5 masters and moments, by parameter name: carried through the resume, not restarted
    ours, reference = _state(resumed, 5), _state(straight, 5)
    assert sorted(ours.params) == sorted(reference.params)
    assert ours.step == reference.step  # Adam's count: 5, or 6 where bf16 ZeRO-0's optimizer takes a step at start
    for kind in KINDS:
        errors = {name: _relative(ours.full(name, kind), reference.full(name, kind)) for name in reference.params}
        if bf16 and kind == "fp32":  # a bf16 step moves each weight by ±lr where its gradient's sign is marginal:
            errors = {"all": _relative(*(torch.cat([s.full(n).reshape(-1) for n in reference.params])  # whole model
                                         for s in (ours, reference)))}
        worst = max(errors, key=errors.get)
        assert errors[worst] <= (2e-2 if bf16 else 1e-3), (source, target, kind, worst, errors[worst])


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    value = float((a - b).norm() / b.norm().clamp_min(1e-30))
    assert math.isfinite(value)
    return value


def _write_slices(directory, weight: torch.Tensor, dim: int, parts: int, zero: int) -> None:
    """`weight` as `parts` tensor-parallel parts along `dim`, each cut into `zero` flat ranges, one file per range."""
    gathered = []
    for t, part in enumerate(weight.chunk(parts, dim=dim)):
        flat = part.reshape(-1)
        bounds = [round(i * flat.numel() / zero) for i in range(zero + 1)]
        for z, (a, b) in enumerate(zip(bounds, bounds[1:])):
            rank = t * zero + z
            file, key = f"rank{rank:05d}-0.safetensors", f"fp32/w/{t}/{a}"
            save_file({key: flat[a:b].clone()}, os.path.join(directory, DIR, file))
            gathered.append(([Piece("w", "fp32", t, a, b, file, key)],
                             {"w": {"shape": list(weight.shape), "split_dim": dim, "tensor": parts}}))
    write_index(str(directory), gathered, 7, None, {"tensor": parts})


def test_slices_read_back_on_the_same_cut_another_cut_and_whole(tmp_path):
    """A row-parallel weight cut in two by tensor parallelism and each half in three by ZeRO reads back: a range of
    one part from the ranges that overlap it, as parts of another cut (three along the other dimension), and whole;
    a piece that is missing is an error naming what is missing."""
    os.makedirs(tmp_path / DIR)
    weight = torch.arange(6 * 8, dtype=torch.float32).view(6, 8)
    _write_slices(tmp_path, weight, dim=1, parts=2, zero=3)
    stored = Stored(str(tmp_path))
    assert stored.step == 7
    part1 = weight.chunk(2, dim=1)[1].reshape(-1)
    assert torch.equal(stored.read("w", "fp32", 1, 1, 2, 5, 19), part1[5:19])  # spans two ZeRO ranges
    for t, part in enumerate(weight.chunk(3, dim=0)):
        assert torch.equal(stored.read("w", "fp32", 0, t, 3, 0, part.numel()), part.reshape(-1))
    assert torch.equal(stored.full("w"), weight)
    os.remove(tmp_path / DIR / "rank00004-0.safetensors")  # part 1, second ZeRO range
    index = json.loads((tmp_path / DIR / "index.json").read_text())
    index["pieces"]["w"] = [row for row in index["pieces"]["w"] if row[4] != "rank00004-0.safetensors"]
    (tmp_path / DIR / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"fp32 of w \(tensor part 1\) has 16 of the 24 elements"):
        Stored(str(tmp_path)).full("w")


def test_each_rank_seals_the_files_it_wrote(tmp_path):
    """The manifest is made in parallel: a rank's slice files go to the rank that wrote them (its fsync flushes
    its own writes), everything else to the smallest share so far, largest first."""
    names = {"portable/rank00003-0.safetensors": 10, "portable/rank00001-0.safetensors": 30,
             "portable/rank00001-1.safetensors": 5, "portable/index.json": 8, "megapile_state.json": 4,
             "tokenizer/tokenizer.json": 50}
    for name, size in names.items():
        os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
        (tmp_path / name).write_bytes(b"x" * size)
    shares = manifest.shares(str(tmp_path), manifest.files(str(tmp_path)), 4, _writer)
    assert shares[3] == ["portable/rank00003-0.safetensors"]
    assert shares[1] == ["portable/rank00001-0.safetensors", "portable/rank00001-1.safetensors"]
    assert shares[0] == ["tokenizer/tokenizer.json"]  # the largest unowned file to the first empty share
    assert shares[2] == ["portable/index.json", "megapile_state.json"]  # then the smallest share, rank 2 (0 bytes)
    assert sorted(sum(shares, [])) == sorted(names)
