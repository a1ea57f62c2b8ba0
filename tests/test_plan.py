"""`megapile plan`: the memory model against hand arithmetic and DeepSpeed's estimators; GPT-NeoX-20B's real
layout (TP2 x PP4 x ZeRO-1 on 96 A100-40GB) must come out as fitting."""
import os

import pytest

from megapile.cli import main
from megapile.config import load_config
from megapile.parallel.plan import Layout, deepspeed_estimate_gb, estimate, total_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model(name):
    return load_config(os.path.join(ROOT, "configs", name)).model


def test_parameter_counts_match_the_published_sizes():
    assert total_params(_model("neox-20b.yaml")) / 1e9 == pytest.approx(20.55, abs=0.01)  # paper: 20.55B
    assert total_params(_model("pythia-160m.yaml")) / 1e6 == pytest.approx(162.3, abs=0.5)  # HF: 162,322,944
    assert total_params(_model("pythia-1b.yaml")) / 1e6 == pytest.approx(1011.8, abs=0.5)  # HF: 1,011,781,632


def test_model_states_by_hand():
    m = _model("pythia-1b.yaml")
    n = total_params(m)
    zero0 = estimate(m, Layout(1, 1, 8, 0, 1, False), 2048)
    assert zero0.states_bytes == pytest.approx(20 * n, rel=1e-4)  # (the final norm is not counted per stage)
    zero1 = estimate(m, Layout(1, 1, 8, 1, 1, False), 2048)
    assert zero1.states_bytes == pytest.approx(8 * n + 12 * n / 8, rel=1e-4)
    tp2 = estimate(m, Layout(2, 1, 4, 0, 1, False), 2048)
    assert tp2.params_per_gpu == pytest.approx(n / 2, rel=1e-4)
    # activation checkpointing keeps 2*s*b*h per layer instead of s*b*h*(10 + 24/t), plus one working layer
    plain = estimate(m, Layout(1, 1, 8, 1, 4, False), 2048).activation_bytes
    ckpt = estimate(m, Layout(1, 1, 8, 1, 4, True), 2048).activation_bytes
    logits = 2048 * 4 * m.padded_vocab_size * 4
    assert plain - logits == pytest.approx(16 * 2048 * 4 * 2048 * 34)
    assert ckpt - logits == pytest.approx(16 * 2 * 2048 * 4 * 2048 + 2048 * 4 * 2048 * 34)


def test_the_async_snapshot_in_host_memory(capsys):
    """checkpoint.async keeps 12 bytes per parameter element a GPU writes (1/DP of what it holds) in host memory;
    the plan's last column is that × the GPUs of a node."""
    m = _model("pythia-1b.yaml")
    n = total_params(m)
    assert estimate(m, Layout(1, 1, 16, 1, 1, False), 2048).snapshot_bytes == pytest.approx(12 * n / 16, rel=1e-4)
    assert main(["plan", "--model", os.path.join(ROOT, "configs", "pythia-1b.yaml"), "--gpus", "16",
                 "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].endswith("async host GB/node")
    row = next(r.split() for r in out[2:] if r.split()[:5] == ["1", "1", "16", "1", "1"])
    assert float(row[-1]) == pytest.approx(12 * n / 16 * 8 / 1e9, abs=0.06)


@pytest.mark.parametrize("zero", [2, 3])
def test_close_to_deepspeeds_own_estimate(zero):
    m = _model("pythia-1b.yaml")
    ours = estimate(m, Layout(1, 1, 16, zero, 1, False), 2048).states_bytes / 1e9
    assert ours == pytest.approx(deepspeed_estimate_gb(m, Layout(1, 1, 16, zero, 1, False)), rel=0.35)


def test_neox_20b_layout_fits_on_96_a100_40gb(capsys):
    m = _model("neox-20b.yaml")
    real = estimate(m, Layout(tp=2, pp=4, dp=12, zero=1, micro=4, checkpointing=True), 2048)
    assert real.fits(40)
    assert not estimate(m, Layout(tp=1, pp=1, dp=96, zero=1, micro=4, checkpointing=True), 2048).fits(40)
    assert main(["plan", "--model", os.path.join(ROOT, "configs", "neox-20b.yaml"), "--gpus", "96",
                 "--gpu-memory", "40"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert any(r.split()[:6] == ["2", "4", "12", "1", "4", "yes"] and r.split()[10] == "yes" for r in rows[2:] if r.split())


def test_activation_units_for_gqa_and_swiglu():
    """MHA with a 4h GELU MLP is Korthikanti's 34 (10 + 24/t); GQA stores smaller K and V, SwiGLU four f-wide
    tensors instead of two."""
    from megapile.parallel.plan import activation_units

    assert activation_units(_model("pythia-1b.yaml"), 1) == 34 and activation_units(_model("pythia-1b.yaml"), 2) == 22
    m = _model("llama-8b.yaml")  # nkv/nh = 1/4, f/h = 3.5
    assert activation_units(m, 1) == pytest.approx(10 + 4 + 1 + 8 * 3.5)
    assert activation_units(m, 4) == pytest.approx(10 + (5 + 28) / 4)


def test_llama_parameter_counts_match_the_published_sizes():
    """Grouped-query attention (k/v projections nkv x hs wide) and SwiGLU (three matrices), no biases."""
    assert total_params(_model("llama-8b.yaml")) == 8_030_261_248  # Meta-Llama-3-8B
    assert total_params(_model("llama-70b.yaml")) == 70_553_706_496  # Meta-Llama-3-70B
    assert total_params(_model("llama-1b.yaml")) == 1_235_814_400  # Llama-3.2-1B (tied)


def test_qwen2_parameter_count_matches_the_published_size():
    """Qwen2's q/k/v biases (nh + 2 nkv) hs per layer are counted, no other bias, tied head."""
    m = _model("qwen2.5-0.5b.yaml")
    assert (m.rotary_base, m.norm_eps, m.family.qkv_bias, m.family.linear_bias) == (1e6, 1e-6, True, False)
    assert total_params(m) == 494_032_768  # Qwen2.5-0.5B


@pytest.mark.parametrize("preset,gpus,memory", [("llama-8b.yaml", 8, 80), ("llama-70b.yaml", 64, 80)])
def test_llama_plans_have_fitting_layouts(preset, gpus, memory, capsys):
    """`megapile plan` lists layouts for Llama-3 8B and 70B; tensor parallelism never exceeds 8 (the key/value
    heads)."""
    assert main(["plan", "--model", os.path.join(ROOT, "configs", preset), "--gpus", str(gpus),
                 "--gpu-memory", str(memory)]) == 0
    rows = [r.split() for r in capsys.readouterr().out.splitlines()[2:] if r.split() and r.split()[0].isdigit()]
    assert rows and all(r[10] == "yes" for r in rows)
    assert all(8 % int(r[0]) == 0 for r in rows)


@pytest.mark.parametrize("preset,gpus", [("neox-20b.yaml", 96), ("llama-8b.yaml", 8), ("pythia-1b.yaml", 16)])
def test_every_listed_layout_is_one_training_accepts(preset, gpus, capsys):
    """Every row `megapile plan --all` prints, set in the preset's config, passes training's own checks (layout,
    DeepSpeed config, bf16: what plan assumes); layouts training refuses (tensor parallelism with ZeRO-0/3, a
    pipeline with ZeRO-2/3 or with ZeRO-0 in bf16) are not listed."""
    import torch

    from megapile.parallel.ds_config import resolve_parallel

    path = os.path.join(ROOT, "configs", preset)
    assert main(["plan", "--model", path, "--gpus", str(gpus), "--gpu-memory", "80", "--all"]) == 0
    rows = [r.split()[:6] for r in capsys.readouterr().out.splitlines()[2:] if r.split() and r.split()[0].isdigit()]
    layouts = {(int(tp), int(pp), int(zero), int(micro)) for tp, pp, _, zero, micro, _ in rows}
    assert any(tp > 1 for tp, *_ in layouts) and any(pp > 1 for _, pp, *_ in layouts)
    for tp, pp, zero, micro in layouts:
        cfg = load_config(path, [f"parallel.tensor={tp}", f"parallel.pipeline={pp}", f"parallel.zero_stage={zero}",
                                 f"train.micro_batch_size={micro}", "train.dtype=bf16"])
        resolve_parallel(cfg, None, gpus, torch.device("cuda"))  # raises ConfigError on a refused layout
    assert not any((tp > 1 and zero in (0, 3)) or (pp > 1 and zero != 1) for tp, pp, zero, _ in layouts)
