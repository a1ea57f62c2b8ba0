"""Tensor and pipeline parallel training on CPU (gloo) against the one-process run, step by step.

Every layout starts from the same weights (per-name seeded init) and reads the same global batches, so
in fp32 the per-step losses must agree to 1e-5 relative; the last stage's loss reaches rank 0's log.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from train_helpers import ROOT, assert_close, launch, losses, read_metrics, small_run_overrides


@pytest.fixture(scope="module")
def reference(tmp_path_factory, preprocessed, tokenizer_path):
    """10 steps in one plain process: global batch 8 = micro 2 × accumulation 4."""
    run_dir = str(tmp_path_factory.mktemp("ref") / "run")
    launch("python", 1, "zero0.json", small_run_overrides(preprocessed, tokenizer_path, run_dir))
    return run_dir


def _run(tmp_path, preprocessed, tokenizer_path, nproc, ds_config, **overrides):
    run_dir = str(tmp_path / "run")
    proc = launch("ranks", nproc, ds_config, small_run_overrides(preprocessed, tokenizer_path, run_dir, **overrides))
    return run_dir, proc


@pytest.mark.slow
@pytest.mark.parametrize("nproc,tensor,pipeline,ds_config", [
    (4, 2, 1, "zero2.json"),
    (4, 1, 2, "zero1.json"),
], ids=["tp2xdp2-zero2", "pp2xdp2-zero1"])  # TP2×PP2: test_tp2_pp2_matches_one_process_and_checkpoint_consolidates
def test_parallel_layout_matches_one_process(nproc, tensor, pipeline, ds_config, tmp_path, reference, preprocessed,
                                             tokenizer_path):
    run_dir, proc = _run(tmp_path, preprocessed, tokenizer_path, nproc, ds_config,
                         parallel__tensor=tensor, parallel__pipeline=pipeline)
    assert f"TP {tensor} × PP {pipeline} × DP {nproc // (tensor * pipeline)}" in proc.stdout
    assert_close(losses(run_dir), losses(reference), rel=1e-5)
    assert read_metrics(run_dir)[-1]["val_loss"] == pytest.approx(read_metrics(reference)[-1]["val_loss"], rel=1e-5)


def _consolidated_model(checkpoints: str, out: str):
    """`megapile ckpt consolidate` the newest checkpoint, then load the file into a plain GPT."""
    from safetensors.torch import load_file

    from megapile.config import ModelConfig
    from megapile.model import build_model

    proc = subprocess.run([sys.executable, "-m", "megapile.cli", "ckpt", "consolidate", checkpoints, "--output", out],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    with open(os.path.join(checkpoints, "latest")) as f:
        with open(os.path.join(checkpoints, f.read().strip(), "megapile_state.json")) as g:
            model_cfg = ModelConfig(**json.load(g)["config"]["model"])
    model = build_model(model_cfg, seed=0)
    model.load_state_dict(load_file(out), strict=True)
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("tensor,pipeline", [(2, 2)], ids=["tp2xpp2"])
def test_tp2_pp2_matches_one_process_and_checkpoint_consolidates(tensor, pipeline, tmp_path, reference, preprocessed,
                                                         tokenizer_path):
    """TP2 × PP2 on 4 ranks matches one process, and its checkpoint consolidates to weights whose logits equal the
    one-process model's. Its bit-exact resume (with dropout) and its resume on 1 rank are the configuration
    matrix's tp2pp2 cell and the layouts test's tp2pp2 source; TP2 and PP2 alone are checked the same ways there."""
    whole = str(tmp_path / "whole")
    launch("ranks", tensor * pipeline, "zero1.json", small_run_overrides(
        preprocessed, tokenizer_path, whole, parallel__tensor=tensor, parallel__pipeline=pipeline, optim__decay_steps=10))
    assert_close(losses(whole), losses(reference), rel=1e-5)

    state_file = os.path.join(whole, "checkpoints", "global_step10", "megapile_state.json")
    with open(state_file) as f:
        assert json.load(f)["parallel"] == {"tensor": tensor, "pipeline": pipeline, "data": 1}
    parallel_model = _consolidated_model(os.path.join(whole, "checkpoints"), str(tmp_path / "parallel.safetensors"))
    one_model = _consolidated_model(os.path.join(reference, "checkpoints"), str(tmp_path / "one.safetensors"))
    x = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(parallel_model(x), one_model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_pipeline_tied_gpt2_with_checkpointing_and_given_split(tmp_path, preprocessed, tokenizer_path):
    """GPT-2 ties the head to the embedding across stages (TiedLayerSpec); blocks are recomputed in backward
    (non-reentrant checkpointing); the split is given block by block. Same losses and gradient norms as one
    process (ZeRO-0: the norm is megapile's, parallel/pipeline.py), with clipping on at every step."""
    gpt2 = dict(model__arch="gpt2", model__activation_checkpointing=True, optim__grad_clip=0.05)
    one = str(tmp_path / "one")
    launch("python", 1, "zero0.json", small_run_overrides(preprocessed, tokenizer_path, one, **gpt2))
    run_dir, proc = _run(tmp_path, preprocessed, tokenizer_path, 2, "zero0.json", parallel__pipeline=2,
                         parallel__pipeline_layers="[2,0]", **gpt2)
    assert "TP 1 × PP 2 × DP 1" in proc.stdout
    assert_close(losses(run_dir), losses(one), rel=1e-5)
    norms = [r["grad_norm"] for r in read_metrics(one)]
    assert min(norms) > 0.05  # clipped at every step
    assert_close([r["grad_norm"] for r in read_metrics(run_dir)], norms, rel=1e-5)


# ----------------------------------------------------------------------------- llama

# Grouped-query attention (4 query heads over 2 key/value heads: one per rank under TP2), SwiGLU, RMSNorm,
# no biases, untied head.
LLAMA = dict(model__arch="llama", model__num_kv_heads=2, model__intermediate_size=160)


@pytest.fixture(scope="module")
def llama_reference(tmp_path_factory, preprocessed, tokenizer_path):
    """10 llama steps in one plain process, checkpointed at the end."""
    run_dir = str(tmp_path_factory.mktemp("llama_ref") / "run")
    launch("python", 1, "zero0.json", small_run_overrides(preprocessed, tokenizer_path, run_dir,
                                                          optim__decay_steps=10, **LLAMA))
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("nproc,tensor,pipeline,ds_config", [
    (2, 2, 1, "zero1.json"),
    (2, 1, 1, "zero3.json"),
    (4, 2, 2, "zero1.json"),
], ids=["llama-tp2", "llama-zero3xdp2", "llama-tp2xpp2"])
def test_llama_layout_matches_one_process(nproc, tensor, pipeline, ds_config, tmp_path, llama_reference, preprocessed,
                                          tokenizer_path):
    """Whole key/value heads per tensor rank (AutoTP; and megapile's split of the blocks inside pipeline stages,
    with pipeline stages of llama blocks, in TP2 × PP2), ZeRO-3's partitioned build of llama (ZeRO-0 is the
    reference and the resume test, ZeRO-1 the TP runs; ZeRO-1/2 and PP alone are family-blind paths the
    configuration matrix covers): per-step losses equal the one-process run's to 1e-5."""
    run_dir, proc = _run(tmp_path, preprocessed, tokenizer_path, nproc, ds_config, parallel__tensor=tensor,
                         parallel__pipeline=pipeline, optim__decay_steps=10, **LLAMA)
    assert f"TP {tensor} × PP {pipeline} × DP {nproc // (tensor * pipeline)}" in proc.stdout
    assert_close(losses(run_dir), losses(llama_reference), rel=1e-5)


@pytest.mark.slow
def test_llama_resume_is_bit_exact(tmp_path, llama_reference, preprocessed, tokenizer_path):
    """6 steps + restart against the uninterrupted 10: identical losses; the checkpoint consolidates to weights
    with the uninterrupted run's logits."""
    split = str(tmp_path / "split")
    launch("python", 1, "zero0.json", small_run_overrides(preprocessed, tokenizer_path, split, train__max_steps=6,
                                                          checkpoint__every=3, optim__decay_steps=10, **LLAMA))
    proc = launch("python", 1, "zero0.json", small_run_overrides(preprocessed, tokenizer_path, split,
                                                                 optim__decay_steps=10, **LLAMA))
    assert "resumed from" in proc.stdout and "at step 6" in proc.stdout
    assert losses(split) == losses(llama_reference)
    resumed = _consolidated_model(os.path.join(split, "checkpoints"), str(tmp_path / "resumed.safetensors"))
    whole = _consolidated_model(os.path.join(llama_reference, "checkpoints"), str(tmp_path / "whole.safetensors"))
    assert resumed.cfg.arch == "llama" and resumed.cfg.num_kv_heads == 2
    x = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(resumed(x), whole(x))
