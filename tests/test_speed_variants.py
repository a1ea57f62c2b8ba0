"""The speed and memory switches change how the numbers are computed, never which numbers come out.

Each variant (`model.compile`, `model.chunked_loss`, `model.activation_checkpointing` with
`model.checkpoint_every`) is compared with the plain path: the same loss and the same gradients on
one model, then the same per-step losses through train.py. Speed and memory are measured by
bench/train_throughput.py and bench/memory.py, not here.
"""
import pytest
import torch
from train_helpers import assert_close, launch, losses, small_run_overrides

from megapile.config import ConfigError, ModelConfig, load_config
from megapile.model import build_model, compile_blocks

SHAPE = dict(arch="neox", num_layers=4, hidden_size=64, num_heads=4, vocab_size=300, max_seq_len=64)


def _cfg(**kw) -> ModelConfig:
    return ModelConfig(**{**SHAPE, **kw})


def _loss_and_grads(model, seed: int = 0):
    ids = torch.randint(0, 300, (3, 29), generator=torch.Generator().manual_seed(seed))
    targets = torch.randint(0, 300, (3, 29), generator=torch.Generator().manual_seed(seed + 1))
    targets[0, :5] = -100  # ignored positions take part in every variant
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # dropout draws the same masks in every variant
    loss = model(ids, targets=targets)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_same(reference, other, rtol=1e-5, atol=1e-6):
    (l1, g1), (l2, g2) = reference, other
    torch.testing.assert_close(l2, l1, rtol=rtol, atol=atol)
    assert g1.keys() == g2.keys()
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=rtol, atol=atol, msg=name)


LLAMA = dict(arch="llama", num_kv_heads=2, intermediate_size=96)  # grouped-query attention, SwiGLU


@pytest.mark.parametrize("arch", ["neox", "gpt2", "llama"])
def test_chunked_loss_matches_plain_cross_entropy(arch):
    kw = LLAMA if arch == "llama" else dict(arch=arch)
    plain = build_model(_cfg(chunked_loss=False, **kw), seed=3).train()
    chunked = build_model(_cfg(chunked_loss=True, **kw), seed=3).train()
    _assert_same(_loss_and_grads(plain), _loss_and_grads(chunked))


def test_chunked_loss_matches_plain_in_bf16():
    """Under bf16 both paths keep logits and softmax in fp32: the loss agrees to bf16's precision of the
    activations, and the gradients to a few bf16 ulps."""
    plain = build_model(_cfg(chunked_loss=False), seed=3).to(torch.bfloat16).train()
    chunked = build_model(_cfg(chunked_loss=True), seed=3).to(torch.bfloat16).train()
    (l1, g1), (l2, g2) = _loss_and_grads(plain), _loss_and_grads(chunked)
    torch.testing.assert_close(l2.float(), l1.float(), rtol=1e-3, atol=1e-3)
    for name in g1:
        torch.testing.assert_close(g2[name].float(), g1[name].float(), rtol=2e-2, atol=2e-3, msg=name)


def test_chunked_loss_matches_plain_under_bf16_autocast():
    """Under autocast the chunked loss multiplies in the autocast dtype, as autocast runs F.linear."""
    plain = build_model(_cfg(chunked_loss=False), seed=3).train()
    chunked = build_model(_cfg(chunked_loss=True), seed=3).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (l1, g1), (l2, g2) = _loss_and_grads(plain), _loss_and_grads(chunked)
    torch.testing.assert_close(l2.float(), l1.float(), rtol=1e-3, atol=1e-3)
    for name in g1:
        assert g2[name].dtype == torch.float32, name  # the weights and their gradients stay fp32
        torch.testing.assert_close(g2[name], g1[name], rtol=2e-2, atol=2e-3, msg=name)


@pytest.mark.parametrize("every", [1, 2, 3])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_checkpoint_every_k_blocks_matches_no_checkpointing(every, dropout):
    plain = build_model(_cfg(dropout=dropout), seed=5).train()
    ckpt = build_model(_cfg(dropout=dropout, activation_checkpointing=True, checkpoint_every=every), seed=5).train()
    _assert_same(_loss_and_grads(plain), _loss_and_grads(ckpt))


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_llama_checkpointing_matches_no_checkpointing(dropout):
    plain = build_model(_cfg(dropout=dropout, **LLAMA), seed=5).train()
    ckpt = build_model(_cfg(dropout=dropout, activation_checkpointing=True, **LLAMA), seed=5).train()
    _assert_same(_loss_and_grads(plain), _loss_and_grads(ckpt))


def test_llama_compiled_blocks_match_eager():
    """torch.compile of llama's blocks (RMSNorm, SwiGLU, grouped-query attention) against eager, two steps."""
    eager = build_model(_cfg(**LLAMA), seed=7).train()
    compiled = compile_blocks(build_model(_cfg(compile=True, **LLAMA), seed=7).train())
    for seed in (0, 1):
        _assert_same(_loss_and_grads(eager, seed), _loss_and_grads(compiled, seed), rtol=1e-4, atol=1e-5)


def test_checkpoint_every_must_be_positive():
    with pytest.raises(ConfigError, match="model.checkpoint_every"):
        _cfg(checkpoint_every=0)
    cfg = load_config(None, ["model.compile=true", "model.chunked_loss=false", "model.checkpoint_every=2"])
    assert (cfg.model.compile, cfg.model.chunked_loss, cfg.model.checkpoint_every) == (True, False, 2)
    assert (ModelConfig().compile, ModelConfig().chunked_loss, ModelConfig().checkpoint_every) == (False, True, 1)


def test_compiled_blocks_match_eager_with_every_other_switch():
    """torch.compile of each block (inductor on CPU) against eager, two steps (the second reuses the graph),
    together with the plain loss and checkpointing of every second block."""
    eager = build_model(_cfg(), seed=7).train()
    compiled = compile_blocks(build_model(_cfg(compile=True, chunked_loss=False, activation_checkpointing=True,
                                               checkpoint_every=2), seed=7).train())
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in eager.named_parameters()]
    for seed in (0, 1):
        _assert_same(_loss_and_grads(eager, seed), _loss_and_grads(compiled, seed), rtol=1e-4, atol=1e-5)


def test_training_with_every_switch_matches_the_default_run(tmp_path, preprocessed, tokenizer_path):
    """Through train.py: compiled blocks, the plain loss and checkpointing every second block give the per-step
    losses of the default run; both print the end-of-run throughput summary."""
    runs = {}
    for name, extra in (("default", {}),
                        ("variants", dict(model__compile=True, model__chunked_loss=False,
                                          model__activation_checkpointing=True, model__checkpoint_every=2))):
        run_dir = str(tmp_path / name)
        proc = launch("python", 1, "zero0.json", small_run_overrides(
            preprocessed, tokenizer_path, run_dir, train__max_steps=6, train__log_every=2, model__num_layers=3,
            **extra))
        summary = [line for line in proc.stdout.splitlines() if line.startswith("throughput over")]
        assert len(summary) == 1 and "4 steps (first interval excluded as warm-up)" in summary[0], proc.stdout
        assert "tokens/s" in summary[0] and "MFU" in summary[0]
        runs[name] = losses(run_dir)
    assert len(runs["default"]) == 3
    assert_close(runs["variants"], runs["default"], rel=1e-4)
