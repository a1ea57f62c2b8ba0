"""Any checkpoint resumes on any layout: written under each source layout, resumed under each target layout.

    sources  TP2 (ZeRO-1), PP2 (ZeRO-0), TP2 × PP2 (ZeRO-1, 4 ranks), ZeRO-1, ZeRO-2, ZeRO-3 (2 ranks), bf16 ZeRO-0
    targets  1 rank ZeRO-0, 2 ranks ZeRO-3, TP2 (ZeRO-1), PP2 (ZeRO-0; ZeRO-1 in bf16, which megapile's pipelines need)

Each source trains steps 1-5 straight (each source resumes on one rank, and each split target from at least one
other layout: see CASES), saving at steps 3 and 5 (dropout 0, so every layout computes the same
numbers up to summation order). Each target resumes the source's step-3 checkpoint, trains steps 4-5 and saves.
Checked: the target's losses at steps 4 and 5 equal the source's (1e-5 relative in fp32; bf16 rounds differently
per layout, 1e-2), and
its step-5 fp32 masters and Adam moments, read back by parameter name, equal the source's: each tensor within 1e-3
relative (L2) in fp32, 2e-2 in bf16, where the masters are compared over the whole model (a bf16 step moves a
weight by ±lr wherever its gradient's sign is marginal). Moments restarted at the resume would be 11-87 % off
(exp_avg_sq keeps 0.95² of its step-3 value). A bf16 source resumes in bf16.

The same holds onto another vocabulary padding (a 1027-row vocabulary that tensor 2 pads to 1280 rows, ZeRO-3 and
PP2 with another pad_vocab_multiple), and pythia-1b's and llama-8b's vocabularies read back at tensor 2, 4 and 8
without training.
"""
import json
import math
import os

import pytest
import torch
from harness import run_ranks
from safetensors.torch import save_file
from train_helpers import ROOT, TRAIN, read_metrics, small_run_overrides

from megapile.checkpoint.fragments import DIR, KINDS, Piece, Stored, write_index

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
    return run_ranks("ranks", ranks, [TRAIN] + small_run_overrides(preprocessed, tokenizer_path, run_dir,
                                                                      **{**COMMON, **overrides}),
                     run_dir + "-logs").stdout


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


# Slices are layout-free: a source's save and a target's load are separate code paths. Every source resumes on one
# rank (the tightest check: nothing split); every split target resumes from another layout (a layout resuming its
# own checkpoint, bit for bit, is every cell of tests/test_configuration_matrix.py). The full 7 x 4 grid proved
# nothing more for 21 more runs.
SPLIT_TARGETS = {"tp2": [], "pp2": [], "tp2pp2": ["pp2"], "zero1": ["pp2"], "zero2": ["tp2"], "zero3": [],
                 "bf16-zero0": ["zero3"]}
CASES = [(s, t) for s in SOURCES for t in ["one-zero0"] + SPLIT_TARGETS[s]]


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
    assert "each rank reads its slices of the fp32 masters and Adam moments" in out, out[-3000:]

    mine, theirs = read_metrics(resumed), read_metrics(straight)
    assert [r["step"] for r in mine] == [4, 5]
    rel = 1e-2 if bf16 else 1e-5
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


# A vocabulary like a real preset's (pythia's 50277, llama's 128256 at tensor 4 or 8): a row count that tensor 2
# does not divide. 1027 rows (the tokenizer's 1024 and three more that only the softmax sees), padded to a
# multiple of 1 on one rank; tensor 2 pads the same config to lcm(1, 128 × 2) = 1280 rows (tensor 4 and 8 read
# without training: test_a_presets_vocabulary_reads_back_at_tensor_2_4_8).
VOCAB = 1027
PADDED = dict(COMMON, model__vocab_size=VOCAB, model__pad_vocab_multiple=1)
ONE, TP2 = (1, {"parallel__zero_stage": 0}), (2, {"parallel__zero_stage": 1, "parallel__tensor": 2})
PADDING_CASES = {  # name: (source, target, the target's rows)
    "one-to-tp2": (ONE, TP2, 1280),  # the same config plus parallel.tensor=2
    "one-to-zero3-pad512": (ONE, (2, {"parallel__zero_stage": 3, "model__pad_vocab_multiple": 512}), 1536),
    "one-to-pp2-pad256": (ONE, (2, {"parallel__zero_stage": 0, "parallel__pipeline": 2,
                                    "model__pad_vocab_multiple": 256}), 1280),  # the head on the last stage
    "tp2-to-one": (TP2, ONE, VOCAB),  # the padding cropped
}


@pytest.fixture(scope="module")
def padded_sources(tmp_path_factory, preprocessed, tokenizer_path):
    """The straight runs of the 1027-row model, trained on first use: {(ranks, overrides) as a key: run directory}."""
    done = {}

    def get(source: tuple) -> str:
        key = repr(source)
        if key not in done:
            run_dir = str(tmp_path_factory.mktemp("padded-source"))
            _train(run_dir, source[0], {**PADDED, **source[1]}, preprocessed, tokenizer_path)
            done[key] = run_dir
        return done[key]
    return get


@pytest.mark.slow
@pytest.mark.parametrize("case", list(PADDING_CASES))
def test_resume_onto_another_vocabulary_padding(case, padded_sources, tmp_path, preprocessed, tokenizer_path):
    """A checkpoint resumes onto a layout that pads the vocabulary differently: the losses are the straight run's,
    the real rows of the embedding and head (masters and moments) are its, the new padding rows are zeros."""
    source, (ranks, overrides), rows = PADDING_CASES[case]
    straight = padded_sources(source)
    resumed = str(tmp_path / "resumed")
    step3 = os.path.join(straight, "checkpoints", "global_step3")
    out = _train(resumed, ranks, {**PADDED, **overrides, "checkpoint__resume": step3}, preprocessed, tokenizer_path)
    assert "the vocabulary padding changed" in out, out[-3000:]

    mine, theirs = read_metrics(resumed), read_metrics(straight)
    assert [r["step"] for r in mine] == [4, 5]
    for a, b in zip(mine, theirs[3:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (case, a["loss"], b["loss"])

    ours, reference = _state(resumed, 5), _state(straight, 5)
    assert ours.params["embed.weight"]["shape"] == [rows, 64]
    for kind in KINDS:
        for name in reference.params:
            a, b = ours.full(name, kind), reference.full(name, kind)
            if name in ("embed.weight", "head.weight"):
                assert not a[VOCAB:].any(), (case, kind, name)  # padding rows: zeros, and zeros stay zeros
                a, b = a[:VOCAB], b[:VOCAB]
            assert _relative(a, b) <= 1e-3, (case, kind, name, _relative(a, b))


class _OneRank:
    """A one-rank ZeRO-0 optimizer as `fragments.write` sees it: every parameter whole, values from a dict."""

    replicated = True

    def __init__(self, values: dict):
        self.values = values  # {(name, kind): flat tensor}

    def span(self, h):
        return 0, h.numel

    def get(self, h, kind):
        return self.values[h.name, kind]


SCALED_DOWN = {  # the preset's vocabulary, its depth and width scaled down
    "pythia-1b": ["model.num_layers=1", "model.hidden_size=64", "model.num_heads=8"],
    "llama-8b": ["model.num_layers=1", "model.hidden_size=64", "model.num_heads=8", "model.intermediate_size=128"],
}


@pytest.mark.parametrize("preset", list(SCALED_DOWN))
def test_a_presets_vocabulary_reads_back_at_tensor_2_4_8(preset, tmp_path):
    """A one-rank checkpoint of pythia-1b's (50277 tokens, 50304 rows) or llama-8b's (128256) vocabulary, read as a
    rank of tensor 2, 4 and 8 reads it, in three ZeRO partitions: the embedding and head padded as that run pads
    them, the saved rows then zeros; every tensor-parallel part the matching cut of the saved tensor. A smaller
    padding reads the saved rows it keeps."""
    from megapile.checkpoint.fragments import write
    from megapile.checkpoint.slices import Held
    from megapile.config import load_config
    from megapile.model import GPT
    from megapile.parallel.layout import Layout, pad_vocab_for_tensor

    def model(tensor: int):
        cfg = load_config(os.path.join(ROOT, "configs", f"{preset}.yaml"),
                          SCALED_DOWN[preset] + [f"parallel.tensor={tensor}"])
        pad_vocab_for_tensor(cfg)
        with torch.device("meta"):
            return cfg.model, dict(GPT(cfg.model).named_parameters())

    model_cfg, params = model(1)
    generator = torch.Generator().manual_seed(0)
    saved = {(n, k): torch.randn(p.numel(), generator=generator) for n, p in params.items() for k in KINDS}
    held = [Held(n, p, tuple(p.shape), None, 0, 1, True) for n, p in params.items()]
    os.makedirs(tmp_path / DIR)
    write_index(str(tmp_path), [write(_OneRank(saved), held, Layout(1, 1, 1, 1), 0, str(tmp_path))], 3, None,
                {"tensor": 1})
    stored, vocab = Stored(str(tmp_path)), model_cfg.vocab_size

    for tensor in (2, 4, 8):
        cfg, params = model(tensor)
        assert cfg.padded_vocab_size % (128 * tensor) == 0 and cfg.padded_vocab_size >= vocab
        for name, p in params.items():
            dim = cfg.family.tensor_plan.split_dim(name)
            for kind in KINDS:
                expected = saved[name, kind].view(stored.params[name]["shape"])
                if name in ("embed.weight", "head.weight"):  # whole on every tensor rank
                    rows = torch.zeros(p.shape)  # grown: the saved rows (real, and pythia's 27 padding), then zeros
                    rows[:len(expected)] = expected
                    expected, parts = rows, [rows]
                else:
                    parts = expected.chunk(tensor, dim=dim) if dim is not None else [expected]
                for tp_rank, part in enumerate(parts):
                    flat = part.reshape(-1)
                    cuts = [round(i * flat.numel() / 3) for i in range(4)]  # one ZeRO partition each
                    got = torch.cat([stored.read(name, kind, dim, tp_rank if dim is not None else 0,
                                                 tensor if dim is not None else 1, a, b, shape=tuple(p.shape))
                                     for a, b in zip(cuts, cuts[1:])])
                    assert torch.equal(got, flat), (tensor, name, kind, tp_rank)
    exact = stored.read("head.weight", "exp_avg", None, 0, 1, 0, vocab * 64, shape=(vocab, 64))  # no padding
    assert torch.equal(exact, saved["head.weight", "exp_avg"][:vocab * 64])
