"""The model against transformers (the oracle), its init, checkpointing, loss and FLOP count.

HF models are built from small random configs locally; nothing is downloaded.
"""
import math
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers  # noqa: E402  (a test dependency: .[test])

from megapile.config import ModelConfig  # noqa: E402
from megapile.hf.convert import (  # noqa: E402
    config_from_hf,
    config_to_hf,
    load_hf_dir,
    state_dict_from_hf,
    state_dict_to_hf,
)
from megapile.hf.export import write_hf_dir  # noqa: E402
from megapile.model import GPT, LinearCrossEntropy, build_model, param_groups  # noqa: E402

VOCAB = 300  # padded to 384: the padding rows are exercised everywhere

NEOX_SHAPES = [
    dict(arch="neox", num_layers=2, hidden_size=64, num_heads=4, rotary_pct=0.25),
    dict(arch="neox", num_layers=2, hidden_size=64, num_heads=4, rotary_pct=1.0),
    dict(arch="neox", num_layers=2, hidden_size=64, num_heads=4, rotary_pct=0.25, parallel_residual=False),
    dict(arch="neox", num_layers=1, hidden_size=96, num_heads=2, rotary_pct=1.0, parallel_residual=False,
         intermediate_size=80, activation="gelu_tanh", rotary_base=500.0),
    dict(arch="neox", num_layers=2, hidden_size=64, num_heads=8, rotary_pct=0.5, tie_embeddings=True),
]
GPT2_SHAPES = [
    dict(arch="gpt2", num_layers=2, hidden_size=64, num_heads=4),
    dict(arch="gpt2", num_layers=1, hidden_size=48, num_heads=3, intermediate_size=100, activation="gelu"),
    dict(arch="gpt2", num_layers=2, hidden_size=64, num_heads=4, tie_embeddings=False),
]
LLAMA_SHAPES = [  # MHA, GQA, MQA, tied, Llama-3 rope scaling, odd MLP width
    dict(arch="llama", num_layers=2, hidden_size=64, num_heads=4, intermediate_size=96),
    dict(arch="llama", num_layers=2, hidden_size=64, num_heads=8, num_kv_heads=2, intermediate_size=160,
         rotary_base=500000.0),
    dict(arch="llama", num_layers=1, hidden_size=64, num_heads=4, num_kv_heads=1, intermediate_size=80),
    dict(arch="llama", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, tie_embeddings=True),
    dict(arch="llama", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=96,
         rotary_base=500000.0, rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                 original_max_seq_len=16)),
]
QWEN2_SHAPES = [  # Llama's layout with q/k/v biases and rotary base 1e6: GQA untied, MHA, MQA tied
    dict(arch="qwen2", num_layers=2, hidden_size=64, num_heads=8, num_kv_heads=2, intermediate_size=160),
    dict(arch="qwen2", num_layers=2, hidden_size=64, num_heads=4, intermediate_size=96, norm_eps=1e-6),
    dict(arch="qwen2", num_layers=1, hidden_size=64, num_heads=4, num_kv_heads=1, intermediate_size=80,
         tie_embeddings=True),
]
ALL_SHAPES = NEOX_SHAPES + GPT2_SHAPES + LLAMA_SHAPES + QWEN2_SHAPES


def make_cfg(**kw) -> ModelConfig:
    kw.setdefault("vocab_size", VOCAB)
    kw.setdefault("max_seq_len", 64)
    return ModelConfig(**kw)


def hf_model(cfg: ModelConfig):
    hf_cfg = config_to_hf(cfg)
    hf_cfg._attn_implementation = "eager"  # the plainest reference
    cls = getattr(transformers, cfg.family.hf.hf_class)
    torch.manual_seed(1)
    return cls(hf_cfg).eval()


def _ids(cfg, B=2, T=19, seed=0):
    return torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def _shape_id(kw):
    return "-".join(f"{k}={v}" for k, v in kw.items() if k != "arch") or kw["arch"]


# ----------------------------------------------------------------------------- HF parity


def _perturb_norms_and_biases(model) -> None:
    """Norm weights away from 1 and biases away from 0 (both models initialise them so), so a misplaced or
    dropped norm or bias (Qwen2's q/k/v biases, GPT-2's regrouped c_attn bias) changes the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name.split(".")[-2]:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)


@pytest.mark.parametrize("kw", ALL_SHAPES, ids=[f"{k['arch']}:{_shape_id(k)}" for k in ALL_SHAPES])
def test_logits_match_hf_ours_to_hf(kw):
    cfg = make_cfg(**kw)
    ours = build_model(cfg, seed=3).eval()
    _perturb_norms_and_biases(ours)
    hf = hf_model(cfg)
    result = hf.load_state_dict(state_dict_to_hf(cfg, ours.state_dict()), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for B, T in [(2, 19), (1, 64)]:
        ids = _ids(cfg, B, T)
        with torch.no_grad():
            a, b = ours(ids), hf(ids).logits
        assert a.shape == (B, T, cfg.padded_vocab_size) == b.shape
        assert (a - b).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kw", ALL_SHAPES, ids=[f"{k['arch']}:{_shape_id(k)}" for k in ALL_SHAPES])
def test_logits_match_hf_hf_to_ours(kw):
    cfg = make_cfg(**kw)
    hf = hf_model(cfg)  # HF's own random init, including non-trivial norms and biases set below
    _perturb_norms_and_biases(hf)
    back = config_from_hf(hf.config, vocab_size=cfg.vocab_size)
    assert back == cfg
    ours = GPT(back).eval()
    ours.load_state_dict(state_dict_from_hf(back, hf.state_dict()), strict=True)
    ids = _ids(cfg)
    with torch.no_grad():
        a, b = ours(ids), hf(ids).logits
    assert (a - b).abs().max().item() <= 1e-4
    # And the way back reproduces HF's tensors exactly.
    sd_back = state_dict_to_hf(cfg, ours.state_dict())
    for k, v in hf.state_dict().items():
        assert torch.equal(sd_back[k], v), k


def test_hf_vocab_not_padded_is_padded_on_import():
    """A HF model with an unpadded vocabulary (GPT-2's 50257-like): rows are zero-padded and the
    logits over the real vocabulary match."""
    cfg = make_cfg(arch="gpt2", num_layers=1, hidden_size=32, num_heads=2)
    hf_cfg = config_to_hf(cfg)
    hf_cfg.vocab_size = VOCAB
    hf_cfg._attn_implementation = "eager"
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    back = config_from_hf(hf.config)
    assert back.vocab_size == VOCAB and back.padded_vocab_size == 384
    ours = GPT(back).eval()
    ours.load_state_dict(state_dict_from_hf(back, hf.state_dict()))
    assert torch.all(ours.embed.weight[VOCAB:] == 0)
    ids = _ids(back)
    with torch.no_grad():
        assert (ours(ids)[..., :VOCAB] - hf(ids).logits).abs().max().item() <= 1e-4


def test_hf_directory_round_trip(tmp_path):
    """write_hf_dir writes what transformers' from_pretrained loads; load_hf_dir reads it back."""
    cfg = make_cfg(arch="neox", num_layers=1, hidden_size=32, num_heads=2)
    ours = build_model(cfg, seed=5).eval()
    write_hf_dir(cfg, ours.state_dict(), None, str(tmp_path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), local_files_only=True).eval()
    ids = _ids(cfg)
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-4
    cfg2, sd = load_hf_dir(str(tmp_path), vocab_size=cfg.vocab_size)
    assert cfg2 == cfg
    assert all(torch.equal(sd[k], v) for k, v in ours.state_dict().items())


def test_unknown_hf_keys_raise():
    cfg = make_cfg(arch="neox", num_layers=1, hidden_size=32, num_heads=2)
    hf_sd = dict(hf_model(cfg).state_dict())
    hf_sd["gpt_neox.layers.0.mystery.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="mystery"):
        state_dict_from_hf(cfg, hf_sd)


# ----------------------------------------------------------------------------- init


def test_parameter_names_are_stable():
    names = [n for n, _ in build_model(make_cfg(num_layers=1), seed=0).named_parameters()]
    assert names == [
        "embed.weight",
        "blocks.0.ln1.weight", "blocks.0.ln1.bias",
        "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias",
        "blocks.0.attn.proj.weight", "blocks.0.attn.proj.bias",
        "blocks.0.ln2.weight", "blocks.0.ln2.bias",
        "blocks.0.mlp.fc_in.weight", "blocks.0.mlp.fc_in.bias",
        "blocks.0.mlp.fc_out.weight", "blocks.0.mlp.fc_out.bias",
        "final_norm.weight", "final_norm.bias",
        "head.weight",
    ]
    gpt2 = [n for n, _ in build_model(make_cfg(arch="gpt2", num_layers=1), seed=0).named_parameters()]
    assert gpt2[:2] == ["embed.weight", "pos_embed.weight"] and "head.weight" not in gpt2


def test_same_seed_same_weights_different_seed_differs():
    cfg = make_cfg()
    a, b, c = build_model(cfg, seed=7), build_model(cfg, seed=7), build_model(cfg, seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["embed.weight"], sc["embed.weight"])
    assert not torch.equal(sa["blocks.1.attn.qkv.weight"], sc["blocks.1.attn.qkv.weight"])


def test_init_does_not_depend_on_layout_or_global_rng():
    """A layer's weights depend on its name only: a 4-layer model's first 2 layers equal a
    2-layer model's (with the scaled-init std fixed by num_layers, so compare unscaled ones),
    and the global RNG does not leak in."""
    torch.manual_seed(123)
    a = build_model(make_cfg(num_layers=4), seed=7).state_dict()
    torch.manual_seed(999)
    b = build_model(make_cfg(num_layers=2), seed=7).state_dict()
    for k in ("embed.weight", "blocks.1.attn.qkv.weight", "blocks.1.mlp.fc_in.weight", "head.weight"):
        assert torch.equal(a[k], b[k]), k
    # The scaled projections differ exactly by the std ratio sqrt(2*2)/sqrt(2*4).
    torch.testing.assert_close(a["blocks.0.attn.proj.weight"] * math.sqrt(2), b["blocks.0.attn.proj.weight"])


def test_meta_construction_then_init_statistics():
    cfg = make_cfg(num_layers=2, hidden_size=128, init_std=0.02)
    with torch.device("meta"):
        model = GPT(cfg)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights(0)
    sd = model.state_dict()
    assert torch.all(sd["blocks.0.ln1.weight"] == 1) and torch.all(sd["blocks.0.ln1.bias"] == 0)
    assert torch.all(sd["blocks.0.attn.qkv.bias"] == 0)
    assert abs(sd["embed.weight"].std().item() - 0.02) < 0.002
    assert abs(sd["blocks.0.mlp.fc_out.weight"].std().item() - 0.02 / 2) < 0.001  # 0.02/sqrt(2*2)
    assert torch.isfinite(model(_ids(cfg))).all()


# ----------------------------------------------------------------------------- training behaviour


def _loss_and_grads(model, ids, targets):
    model.zero_grad()
    loss = model.loss(ids, targets)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_activation_checkpointing_same_loss_and_grads(dropout):
    cfg = make_cfg(dropout=dropout)
    plain = build_model(cfg, seed=1).train()
    ckpt = build_model(make_cfg(dropout=dropout, activation_checkpointing=True), seed=1).train()
    ids, targets = _ids(cfg, seed=1), _ids(cfg, seed=2)
    torch.manual_seed(0)
    l1, g1 = _loss_and_grads(plain, ids, targets)
    torch.manual_seed(0)
    l2, g2 = _loss_and_grads(ckpt, ids, targets)
    torch.testing.assert_close(l1, l2, rtol=0, atol=1e-6)
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-5, atol=1e-6, msg=n)


def test_dropout_in_train_differs_from_eval():
    cfg = make_cfg(dropout=0.1)
    model = build_model(cfg, seed=1)
    ids = _ids(cfg)
    with torch.no_grad():
        e1, e2 = model.eval()(ids), model(ids)
        t1 = model.train()(ids)
    assert torch.equal(e1, e2)
    assert (t1 - e1).abs().max().item() > 1e-3
    no_dropout = build_model(make_cfg(dropout=0.0), seed=1).train()
    with torch.no_grad():
        assert torch.equal(no_dropout(ids), e1)


def test_loss_is_cross_entropy_over_real_vocab():
    cfg = make_cfg()
    model = build_model(cfg, seed=1).eval()
    with torch.no_grad():  # make the padding columns the largest logits: they must not count
        model.head.weight[cfg.vocab_size:].normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
    ids, targets = _ids(cfg, seed=1), _ids(cfg, seed=2)
    targets[0, :3] = -100
    with torch.no_grad():
        logits = model(ids)
        expected = F.cross_entropy(logits[..., : cfg.vocab_size].reshape(-1, cfg.vocab_size), targets.reshape(-1))
        got = model.loss(ids, targets)
        via_forward = model(ids, targets=targets)
        full = F.cross_entropy(logits.reshape(-1, cfg.padded_vocab_size), targets.reshape(-1))
    torch.testing.assert_close(got, expected)
    assert torch.equal(via_forward, got)
    assert (full - expected).abs().item() > 1.0


@pytest.mark.parametrize("chunk_elems", [1 << 26, 7 * 100, 1])  # one chunk, 6 chunks (of 7 and 5 rows), 1 row
def test_linear_cross_entropy_matches_autograd(chunk_elems):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(100, 16, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 100, (40,), generator=g)
    t[::5] = -100
    expected = F.cross_entropy(x @ w.t(), t)
    gx, gw = torch.autograd.grad(expected * 3.0, (x, w))
    got = LinearCrossEntropy.apply(x, w, t, chunk_elems)
    fx, fw = torch.autograd.grad(got * 3.0, (x, w))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fx, gx, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fw, gw, rtol=1e-10, atol=1e-12)


def test_linear_cross_entropy_exact_when_the_target_probability_underflows():
    """Losses of hundreds of nats (a diverging run): the target's softmax probability is 0 in fp32, the loss
    must still be the exact logsumexp - target logit, so a bad step is seen for what it is."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 8, generator=g) * 30
    w = torch.randn(50, 8, generator=g) * 3
    t = (x @ w.t()).argmin(dim=-1)  # the least likely token: probability far below fp32's smallest
    expected = F.cross_entropy((x @ w.t()).double(), t).float()
    got = LinearCrossEntropy.apply(x, w, t)
    assert expected > 150 and torch.isfinite(got)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)


def test_loss_workspace_is_reused_and_grows_with_the_batch():
    """On CPU the model keeps the loss's logits buffer between calls; a larger batch replaces it, and every
    call still gives the plain cross-entropy."""
    cfg = make_cfg()
    model = build_model(cfg, seed=1).train()
    seen = []
    for batch, seed in ((2, 1), (2, 2), (3, 3)):
        ids = torch.randint(0, cfg.vocab_size, (batch, 16), generator=torch.Generator().manual_seed(seed))
        targets = torch.randint(0, cfg.vocab_size, (batch, 16), generator=torch.Generator().manual_seed(seed + 9))
        got = model.loss(ids, targets)
        with torch.no_grad():
            logits = model(ids)[..., : cfg.vocab_size]
        expected = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), targets.reshape(-1))
        torch.testing.assert_close(got.detach(), expected)
        seen.append(model._loss_workspace[0].data_ptr())
    assert seen[0] == seen[1] != seen[2]
    assert model._loss_workspace[0].numel() >= 3 * 16 * cfg.vocab_size


def test_linear_cross_entropy_bf16_close_to_fp32():
    g = torch.Generator().manual_seed(0)
    x32, w32 = torch.randn(64, 32, generator=g), torch.randn(200, 32, generator=g) * 0.2
    t = torch.randint(0, 200, (64,), generator=g)
    x, w = x32.bfloat16().requires_grad_(), w32.bfloat16().requires_grad_()
    loss = LinearCrossEntropy.apply(x, w, t, 16 * 200)
    loss.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == w.grad.dtype == torch.bfloat16
    ref_x, ref_w = x32.clone().requires_grad_(), w32.clone().requires_grad_()
    ref = F.cross_entropy(ref_x @ ref_w.t(), t)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(w.grad.float(), ref_w.grad, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(x.grad.float(), ref_x.grad, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("dtype,loss_scale", [(torch.float16, 2.0**16), (torch.bfloat16, 1.0)], ids=["fp16", "bf16"])
def test_linear_cross_entropy_half_grads_at_scale_close_to_fp32(dtype, loss_scale):
    """At realistic sizes and, under fp16, DeepSpeed's typical loss scale, which arrives only in backward: a
    row's weight-gradient terms, 1/N x 1/V (3e-8 here), are below fp16's smallest subnormal (6e-8), so the
    gradients must stay unscaled until then or they flush to zero."""
    g = torch.Generator().manual_seed(0)
    N, V, C = 4096, 8192, 64
    x_h, w_h = torch.randn(N, C, generator=g).to(dtype), (torch.randn(V, C, generator=g) * 0.02).to(dtype)
    t = torch.randint(0, V, (N,), generator=g)
    t[::97] = -100
    ref_x, ref_w = x_h.float().requires_grad_(), w_h.float().requires_grad_()  # the same values, in fp32
    ref = F.cross_entropy(ref_x @ ref_w.t(), t)
    (ref * loss_scale).backward()
    x, w = x_h.clone().requires_grad_(), w_h.clone().requires_grad_()
    loss = LinearCrossEntropy.apply(x, w, t, 1 << 22, None)  # 8 chunks of 512 rows
    (loss * loss_scale).backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == w.grad.dtype == dtype
    torch.testing.assert_close(loss, ref, rtol=1e-3, atol=0)
    assert torch.all(x.grad[t == -100] == 0)
    untargeted = torch.ones(V, dtype=torch.bool)
    untargeted[t[t >= 0]] = False  # rows of w whose gradient is softmax terms only, the smallest
    for name, got, expected in (("x", x.grad, ref_x.grad), ("w", w.grad, ref_w.grad),
                                ("w untargeted", w.grad[untargeted], ref_w.grad[untargeted])):
        rel = ((got.float() - expected).norm() / expected.norm()).item()
        nonzero, expected_nonzero = (got != 0).float().mean().item(), (expected != 0).float().mean().item()
        assert rel < 1e-2, f"{name}: relative error {rel:.3g}"
        assert abs(nonzero - expected_nonzero) < 1e-3, f"{name}: {nonzero:.4f} nonzero, fp32 {expected_nonzero:.4f}"


@pytest.mark.parametrize("chunk_elems", [1 << 26, 7 * 300])  # one chunk, several
def test_linear_cross_entropy_ignored_rows(chunk_elems):
    """Ignored rows get exactly zero gradient and the loss is the mean over the others; all rows ignored gives
    0 and zero gradients (F.cross_entropy's 0/0 would be nan)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 24, generator=g, requires_grad=True)
    w = torch.randn(300, 24, generator=g, requires_grad=True)
    t = torch.randint(0, 300, (50,), generator=g)
    t[3::4] = -100
    got = LinearCrossEntropy.apply(x, w, t, chunk_elems)
    (gx,) = torch.autograd.grad(got, (x,))
    expected = F.cross_entropy(x @ w.t(), t, ignore_index=-100)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    assert torch.all(gx[t == -100] == 0) and torch.all(gx[t != -100] != 0)
    none = LinearCrossEntropy.apply(x, w, torch.full_like(t, -100), chunk_elems)
    gx, gw = torch.autograd.grad(none, (x, w))
    assert none.item() == 0 and not gx.any() and not gw.any()


def test_model_loss_grads_match_plain_cross_entropy():
    cfg = make_cfg(tie_embeddings=True)  # the head's gradient adds to the embedding's
    model = build_model(cfg, seed=1).train()
    ids, targets = _ids(cfg, seed=1), _ids(cfg, seed=2)
    targets[1, 5:] = -100
    _, fused = _loss_and_grads(model, ids, targets)
    model.zero_grad()
    logits = model(ids)[..., : cfg.vocab_size]
    F.cross_entropy(logits.reshape(-1, cfg.vocab_size), targets.reshape(-1)).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(fused[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("vocab,padded", [(300, 384), (50257, 50304), (50304, 50304), (1, 128)])
def test_padded_vocab_multiple_of_128(vocab, padded):
    cfg = make_cfg(vocab_size=vocab, num_layers=1, hidden_size=8, num_heads=2, rotary_pct=0.5)
    assert cfg.padded_vocab_size == padded
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.embed.weight.shape[0] == padded and model.head.weight.shape[0] == padded


# ----------------------------------------------------------------------------- counting


def test_num_params_and_flops_per_token_by_hand():
    # neox, L=1, C=8, F=32, padded vocab V=128, seq T=16.
    cfg = make_cfg(vocab_size=100, num_layers=1, hidden_size=8, num_heads=2, rotary_pct=0.5)
    with torch.device("meta"):
        model = GPT(cfg)
    C, Fi, V, T = 8, 32, 128, 16
    block = (C * 3 * C + 3 * C) + (C * C + C) + (C * Fi + Fi) + (Fi * C + C) + 2 * 2 * C
    non_embedding = block + 2 * C  # + final norm
    assert model.num_params() == non_embedding == 888
    assert model.num_params(exclude_embedding=False) == non_embedding + 2 * V * C
    assert model.flops_per_token(T) == 6 * (non_embedding + V * C) + 12 * 1 * C * T == 13008
    # gpt2, tied: the head still counts in FLOPs; the position table never does.
    g = make_cfg(arch="gpt2", vocab_size=100, num_layers=1, hidden_size=8, num_heads=2, max_seq_len=16)
    with torch.device("meta"):
        gm = GPT(g)
    assert gm.num_params() == non_embedding
    assert gm.num_params(exclude_embedding=False) == non_embedding + V * C + 16 * C
    assert gm.flops_per_token(T) == 13008


def test_llama_params_and_flops_per_token_by_hand():
    """GQA: q is C x C but k and v are C x (nkv hs) each; SwiGLU: three C x F matrices; no biases; RMSNorm weights
    only. The attention term counts query heads, so it is the MHA one."""
    cfg = make_cfg(arch="llama", vocab_size=100, num_layers=1, hidden_size=16, num_heads=4, num_kv_heads=1,
                   intermediate_size=24)
    with torch.device("meta"):
        model = GPT(cfg)
    C, hs, nkv, Fi, V, T = 16, 4, 1, 24, 128, 16
    block = C * (C + 2 * nkv * hs) + C * C + 3 * C * Fi + 2 * C
    non_embedding = block + C  # + final RMSNorm
    assert model.num_params() == non_embedding == 1840
    assert model.num_params(exclude_embedding=False) == non_embedding + 2 * V * C
    assert model.flops_per_token(T) == 6 * (non_embedding + V * C) + 12 * C * T == 26400
    assert not any(name.endswith(".bias") for name, _ in model.named_parameters())


def test_pythia_14m_non_embedding_params():
    cfg = ModelConfig(num_layers=6, hidden_size=128, num_heads=4, vocab_size=50304)
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.num_params() == 1_189_888  # Pythia's published non-embedding count


def test_param_groups_no_decay_on_biases_and_norms():
    model = build_model(make_cfg(num_layers=1), seed=0)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert sorted(names[id(p)] for p in no_decay["params"]) == sorted(
        n for n in names.values() if n.endswith("bias") or "ln" in n or "norm" in n
    )
    assert {names[id(p)] for p in decay["params"]} == {
        "embed.weight", "head.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight",
        "blocks.0.mlp.fc_in.weight", "blocks.0.mlp.fc_out.weight",
    }


def test_flash_attn_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # as if not installed, whatever this machine has
    with pytest.raises(ImportError, match="flash-attn"):
        GPT(make_cfg(attention="flash_attn"))


def test_sequence_longer_than_max_seq_len_raises():
    cfg = make_cfg(max_seq_len=8)
    with pytest.raises(ValueError, match="max_seq_len"):
        build_model(cfg, seed=0)(_ids(cfg, T=9))
