"""Tensor-parallel evaluation (megapile/parallel/tensor_inference.py): a model split over 2 gloo ranks gives the
whole model's hidden states and per-window NLL, for GPT-NeoX (biases, parallel residual) and Llama (SwiGLU gate,
grouped-query attention with one key/value head per rank); and `megapile eval --tensor-parallel 2` on a TP2
training checkpoint, reading only its own slices, scores as one process does."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megapile.config import ModelConfig
from megapile.evaluation.evaluate import OVERALL, window_nll
from megapile.model import build_model
from megapile.parallel.tensor_inference import RowParallel, build_split, check_split, cut

CONFIGS = {
    "neox": dict(arch="neox", vocab_size=256, num_layers=2, hidden_size=64, num_heads=4, max_seq_len=32),
    "llama": dict(arch="llama", vocab_size=256, num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2,
                  intermediate_size=96, max_seq_len=32),
}


def _ranks(rank: int, init_file: str, arch: str, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    whole = build_model(ModelConfig(**CONFIGS[arch]), seed=5).eval()
    weights = {k: v.clone() for k, v in whole.state_dict().items()}
    split = build_split(whole.cfg, cut(weights, 2, rank), 2, dist.group.WORLD, torch.device("cpu"), torch.float32)
    sizes = {n: tuple(p.shape) for n, p in split.named_parameters()}
    x = torch.randint(0, 256, (3, 20))
    with torch.no_grad():
        error = (split.hidden_states(x) - whole.hidden_states(x)).abs().max().item()
    inputs = [[1, 2, 3, 4, 5], [7] * 20]
    nll = (window_nll(split, inputs, [t[1:] + [9] for t in inputs], [5, 11]),
           window_nll(whole, inputs, [t[1:] + [9] for t in inputs], [5, 11]))
    out[rank] = (error, sizes, nll, sum(isinstance(m, RowParallel) for m in split.modules()))
    dist.destroy_process_group()


@pytest.mark.parametrize("arch", ["neox", "llama"])
def test_a_model_split_over_two_ranks_computes_what_the_whole_model_does(tmp_path, arch):
    out = mp.Manager().dict()
    mp.spawn(_ranks, args=(str(tmp_path / "init"), arch, out), nprocs=2)
    cfg = ModelConfig(**CONFIGS[arch])
    for rank in (0, 1):
        error, sizes, (split_nll, whole_nll), row_parallel = out[rank]
        assert error < 1e-5, (rank, error)
        assert split_nll == pytest.approx(whole_nll, rel=1e-6)
        assert row_parallel == 2 * cfg.num_layers  # attn.proj and mlp.fc_out of every block
        assert sizes["blocks.0.attn.qkv.weight"] == (cfg.qkv_size // 2, cfg.hidden_size)  # one half of the heads
        assert sizes["blocks.0.attn.proj.weight"] == (cfg.hidden_size, cfg.hidden_size // 2)
        assert sizes["blocks.0.mlp.fc_out.weight"] == (cfg.hidden_size, cfg.ffn_size // 2)
        assert sizes["embed.weight"][1] == cfg.hidden_size  # replicated


def test_a_split_that_does_not_give_whole_key_value_heads_is_refused():
    cfg = ModelConfig(**CONFIGS["llama"])
    with pytest.raises(ValueError, match=r"--tensor-parallel 4 must divide the model's 2 key/value heads"):
        check_split(cfg, 4)


@pytest.mark.slow
def test_eval_splits_a_tp2_checkpoint_over_two_ranks_and_scores_as_one_process(tmp_path, preprocessed,
                                                                             tokenizer_path, sample_corpus):
    from harness import run_ranks
    from train_helpers import launch, small_run_overrides

    run_dir = str(tmp_path / "tp2")
    launch("ranks", 2, "zero1.json", small_run_overrides(preprocessed, tokenizer_path, run_dir,
                                                            train__max_steps=2, parallel__tensor=2))
    ckpt = os.path.join(run_dir, "checkpoints")
    data = os.path.join(sample_corpus, "val", "*.jsonl.zst")
    results = {}
    for nproc, tp, dtype in ((1, 1, "fp32"), (2, 2, "fp32"), (2, 2, "bf16")):
        out = str(tmp_path / f"tp{tp}{dtype}.json")
        run_ranks("ranks", nproc, ["-m", "megapile.cli", "eval", "--checkpoint", ckpt, "--data", data, "--max-docs",
                                      "6", "--seq-len", "32", "--tensor-parallel", str(tp), "--dtype", dtype,
                                      "--output", out, "--no-progress"], tmp_path / "logs", timeout=300)
        results[tp, dtype] = json.load(open(out))[OVERALL]
    one, split, half = results[1, "fp32"], results[2, "fp32"], results[2, "bf16"]
    for key in ("documents", "tokens", "bytes"):
        assert one[key] == split[key] == half[key] > 0, key  # every document scored once, not once per rank
    assert split["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert half["loss"] != one["loss"] and half["loss"] == pytest.approx(one["loss"], rel=2e-2)
