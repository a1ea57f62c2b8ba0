"""Export to and import from Hugging Face: the exported model's logits equal ours and its greedy generations
are identical, for both architectures and for checkpoints of every layout (ZeRO-1, ZeRO-3, TP2, PP2);
sharded and bf16 exports; a transformers-made model imported and exported again is unchanged;
`model.init_from` starts training from the HF weights."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import launch, small_run_overrides

from megapile.config import ConfigError, load_config
from megapile.evaluation.generate import generate
from megapile.hf.convert import HF_CLASS
from megapile.hf.export import apply_init_from, load_model, write_hf_dir, write_tokenizer

TEXTS = ["The Pile is a large, diverse dataset for language modelling.", "def main():\n    return 0\n"]


def _train(preprocessed, tokenizer_path, run_dir, launcher="python", nproc=1, ds="zero1.json", **extra):
    extra = {"train__max_steps": 4, **extra}
    launch(launcher, nproc, ds, small_run_overrides(preprocessed, tokenizer_path, str(run_dir), **extra))
    return os.path.join(str(run_dir), "checkpoints")


# llama and qwen2 with grouped-query attention (4 query heads over 2 key/value heads) and SwiGLU
GQA = dict(model__num_kv_heads=2, model__intermediate_size=160)
ARCH_OVERRIDES = {"neox": {}, "gpt2": {}, "llama": GQA, "qwen2": GQA}


@pytest.fixture(scope="module")
def checkpoints(preprocessed, tokenizer_path, tmp_path_factory):
    """A 4-step ZeRO-1 checkpoint of each architecture."""
    return {arch: _train(preprocessed, tokenizer_path, tmp_path_factory.mktemp(f"run_{arch}"), model__arch=arch,
                         **extra) for arch, extra in ARCH_OVERRIDES.items()}


def _export(checkpoint: str, output: str, *extra: str) -> None:
    from megapile.cli import main

    assert main(["export-hf", "--checkpoint", checkpoint, "--output", output, *extra]) == 0


def _assert_same_model(checkpoint: str, hf_dir: str, arch: str) -> None:
    """transformers' logits (fp32) equal ours within 1e-4; its tokenizer and greedy generations equal ours."""
    import transformers

    ours = load_model(checkpoint)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert type(hf).__name__ == HF_CLASS[arch]
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    if ours.cfg.family.hf.tokenizer_note:  # AutoTokenizer builds the family's own class (Qwen2): as the note says
        assert type(hf_tok).__name__ != "TokenizersBackend"
        hf_tok = transformers.PreTrainedTokenizerFast.from_pretrained(hf_dir)
    ids = [ours.tokenizer.encode(t) for t in TEXTS]
    assert [hf_tok(t)["input_ids"] for t in TEXTS] == ids
    assert hf_tok.eos_token_id == ours.tokenizer.eod_id
    n = min(len(i) for i in ids)
    x = torch.tensor([i[:n] for i in ids])
    with torch.no_grad():
        diff = (hf(x).logits - ours.model(x)).abs().max().item()
    assert diff <= 1e-4, diff
    prompt = ids[0][:8]
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[0, len(prompt):].tolist()
    mine = generate(ours.model, [prompt], 16, eod_id=ours.tokenizer.eod_id)[0]
    assert mine == theirs


@pytest.mark.parametrize("arch", list(ARCH_OVERRIDES))
def test_export_equals_ours_in_transformers(arch, checkpoints, tmp_path):
    out = str(tmp_path / "hf")
    _export(checkpoints[arch], out)
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors",
                                       "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    _assert_same_model(checkpoints[arch], out, arch)


class _TransformersScorer:
    """A transformers model behind the few calls `megapile.evaluation.evaluate` makes of ours (hidden states, head), so the
    same scoring code reads both and only the model differs."""

    def __init__(self, hf, cfg):
        self.hf, self.cfg = hf, cfg

    def parameters(self):
        return self.hf.parameters()

    def hidden_states(self, x):
        return self.hf.base_model(x).last_hidden_state  # after the final norm, as ours

    def _head_weight(self):
        return self.hf.get_output_embeddings().weight


@pytest.mark.parametrize("arch", list(ARCH_OVERRIDES))
def test_export_scores_the_same_bits_per_byte_in_transformers(arch, checkpoints, sample_corpus, tmp_path):
    """Export, reload with transformers, score the validation documents: the bits per byte equal ours."""
    import transformers

    from megapile.evaluation.evaluate import OVERALL, evaluate

    out = str(tmp_path / "hf")
    _export(checkpoints[arch], out)
    ours = load_model(checkpoints[arch])
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    data = os.path.join(sample_corpus, "val", "*.jsonl.zst")
    with torch.no_grad():
        mine = evaluate(ours.model, ours.tokenizer, data, max_docs=6)[OVERALL].metrics()
        theirs = evaluate(_TransformersScorer(hf, ours.cfg), ours.tokenizer, data, max_docs=6)[OVERALL].metrics()
    assert mine["tokens"] > 100 and 0 < mine["bits_per_byte"] < 20
    assert theirs["bits_per_byte"] == pytest.approx(mine["bits_per_byte"], rel=1e-5)


def test_sharded_and_bf16_exports(checkpoints, tmp_path):
    import transformers

    sharded = str(tmp_path / "sharded")
    _export(checkpoints["neox"], sharded, "--max-shard-size", "200KB")
    shards = sorted(f for f in os.listdir(sharded) if f.endswith(".safetensors"))
    assert len(shards) > 1 and "model.safetensors.index.json" in os.listdir(sharded)
    assert all(os.path.getsize(os.path.join(sharded, f)) < 400_000 for f in shards)
    _assert_same_model(checkpoints["neox"], sharded, "neox")

    half = str(tmp_path / "bf16")
    _export(checkpoints["neox"], half, "--dtype", "bf16")
    hf = transformers.AutoModelForCausalLM.from_pretrained(half)
    assert hf.dtype == torch.bfloat16
    ours = load_model(checkpoints["neox"]).model
    assert torch.equal(hf.gpt_neox.embed_in.weight, ours.embed.weight.to(torch.bfloat16))


def test_llama_sharded_export(checkpoints, tmp_path):
    """Shards split between the q/k/v and gate/up/down tensors load into LlamaForCausalLM with our logits, and
    back into megapile bit for bit."""
    sharded = str(tmp_path / "sharded")
    _export(checkpoints["llama"], sharded, "--max-shard-size", "100KB")
    assert len([f for f in os.listdir(sharded) if f.endswith(".safetensors")]) > 2
    _assert_same_model(checkpoints["llama"], sharded, "llama")
    ours, back = load_model(checkpoints["llama"]).model.state_dict(), load_model(sharded).model.state_dict()
    assert ours.keys() == back.keys() and all(torch.equal(ours[k], back[k]) for k in ours)  # and back, losslessly


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["zero3", "tp2", "pp2", "llama-tp2"])
def test_export_from_parallel_checkpoints(layout, preprocessed, tokenizer_path, tmp_path):
    """Two ranks: ZeRO-3 partitions, tensor-parallel slices and pipeline stages are all joined on export; llama's
    tensor-parallel slices hold whole key/value groups and halves of the SwiGLU gate."""
    ds, extra = {"zero3": ("zero3.json", {}), "tp2": ("zero1.json", {"parallel__tensor": 2}),
                 "pp2": ("zero0.json", {"parallel__pipeline": 2}),
                 "llama-tp2": ("zero1.json", {"parallel__tensor": 2, "model__arch": "llama",
                                              **ARCH_OVERRIDES["llama"]})}[layout]
    arch = "llama" if layout.startswith("llama") else "neox"
    ckpt = _train(preprocessed, tokenizer_path, tmp_path / "run", "ranks", 2, ds, **extra)
    out = str(tmp_path / "hf")
    _export(ckpt, out)
    _assert_same_model(ckpt, out, arch)
    init = load_model(ckpt).model.state_dict()
    from megapile.model import build_model

    fresh = build_model(load_model(ckpt).cfg, seed=1234).state_dict()
    assert any(not torch.equal(init[k], fresh[k]) for k in init)  # trained weights, not the initial ones


def _tokenizer(tokenizer_path):
    from megapile.data.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_path)


@pytest.mark.parametrize("arch", ["neox", "gpt2", "llama", "llama-mqa-tied", "qwen2"])
def test_transformers_model_imports_and_exports_losslessly(arch, tokenizer_path, tmp_path):
    """A model made and saved by transformers (vocab 1000: padded to 1024 on import) gives the same logits in
    megapile; exporting it and importing the export again changes no bit."""
    import transformers

    torch.manual_seed(0)
    if arch == "neox":
        config = transformers.GPTNeoXConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=256, max_position_embeddings=64, rotary_pct=0.25)
        hf = transformers.GPTNeoXForCausalLM(config)
    elif arch.startswith("llama"):  # GQA untied with Llama-3 rope scaling; MQA tied
        mqa = arch == "llama-mqa-tied"
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
        plain = {"rope_type": "default", "rope_theta": 10000.0}
        config = transformers.LlamaConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=1 if mqa else 2, intermediate_size=160,
                                          max_position_embeddings=64, tie_word_embeddings=mqa,
                                          rope_parameters=plain if mqa else rope)
        hf = transformers.LlamaForCausalLM(config)
        with torch.no_grad():  # norms away from their initial ones, so a misplaced norm weight shows
            for name, p in hf.named_parameters():
                if "norm" in name:
                    p.normal_(1.0, 0.1)
        arch = "llama"
    elif arch == "qwen2":  # q/k/v biases (set away from 0 below), GQA, tied, rotary base 1e6
        config = transformers.Qwen2Config(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=160, max_position_embeddings=64,
                                          tie_word_embeddings=True,
                                          rope_parameters={"rope_type": "default", "rope_theta": 1e6})
        hf = transformers.Qwen2ForCausalLM(config)
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if name.endswith("_proj.bias") or "norm" in name:
                    p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    else:
        config = transformers.GPT2Config(vocab_size=1000, n_embd=64, n_layer=2, n_head=4, n_positions=64)
        hf = transformers.GPT2LMHeadModel(config)
    hf.eval()
    original = str(tmp_path / "original")
    hf.save_pretrained(original)
    tok = _tokenizer(tokenizer_path)
    write_tokenizer(tok, original, 64)

    imported = load_model(original)
    assert imported.cfg.vocab_size == 1000 and imported.cfg.padded_vocab_size == 1024
    x = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (imported.model(x)[..., :1000] - hf(x).logits).abs().max() <= 1e-4

    once, twice = str(tmp_path / "once"), str(tmp_path / "twice")
    write_hf_dir(imported.cfg, imported.model.state_dict(), tok, once)
    again = load_model(once)
    write_hf_dir(again.cfg, again.model.state_dict(), tok, twice)
    a, b = load_file(os.path.join(once, "model.safetensors")), load_file(os.path.join(twice, "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for k, v in hf.state_dict().items():  # every original tensor is in the export, unchanged (+ zero vocab rows)
        if k in ("lm_head.weight", "embed_out.weight") and config.tie_word_embeddings:
            continue
        name = "embed_out.weight" if k == "lm_head.weight" and arch == "neox" else k
        if name not in a:
            assert name.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")), name
            continue
        got = a[name][: v.shape[0]] if v.shape[0] == 1000 else a[name]
        assert torch.equal(got, v), name
    embed = {"neox": "embed_out.weight", "gpt2": "transformer.wte.weight", "llama": "model.embed_tokens.weight",
             "qwen2": "model.embed_tokens.weight"}
    assert not a[embed[arch]][1000:].any()


def test_init_from_starts_training_from_the_hf_weights(checkpoints, preprocessed, tokenizer_path, tmp_path):
    """Continued pretraining: shapes come from the HF directory (hidden_size=32 below is overridden), weights
    too; one step at lr 1e-12 leaves them where they were."""
    hf_dir = str(tmp_path / "hf")
    _export(checkpoints["neox"], hf_dir)
    run = tmp_path / "continued"
    ckpt = _train(preprocessed, tokenizer_path, run, model__init_from=hf_dir, model__hidden_size=32,
                  model__num_layers=1, train__max_steps=1, optim__lr=1e-12, optim__warmup_steps=0)
    continued = load_model(ckpt)
    assert (continued.cfg.hidden_size, continued.cfg.num_layers) == (64, 2)
    start = load_model(hf_dir).model.state_dict()
    for k, v in continued.model.state_dict().items():
        assert torch.allclose(v, start[k], atol=1e-8), k


def test_llama_init_from_starts_training_from_the_hf_weights(checkpoints, preprocessed, tokenizer_path, tmp_path):
    """Continued pretraining of a Llama export: grouped-query shape and untied head come from the HF directory."""
    hf_dir = str(tmp_path / "hf")
    _export(checkpoints["llama"], hf_dir)
    ckpt = _train(preprocessed, tokenizer_path, tmp_path / "continued", model__init_from=hf_dir, model__arch="neox",
                  train__max_steps=1, optim__lr=1e-12, optim__warmup_steps=0)
    continued = load_model(ckpt)
    assert (continued.cfg.arch, continued.cfg.num_kv_heads, continued.cfg.tie_embeddings) == ("llama", 2, False)
    start = load_model(hf_dir).model.state_dict()
    for k, v in continued.model.state_dict().items():
        assert torch.allclose(v, start[k], atol=1e-8), k


def test_init_from_errors(checkpoints, tokenizer_path, tmp_path):
    from megapile.data.tokenizer import train_tokenizer

    hf_dir = str(tmp_path / "hf")
    _export(checkpoints["gpt2"], hf_dir)
    cfg = load_config(None, [f"model.init_from={hf_dir}"])
    assert apply_init_from(cfg) is not None
    assert (cfg.model.arch, cfg.model.hidden_size, cfg.model.vocab_size, cfg.data.tokenizer) == ("gpt2", 64, 1024, hf_dir)

    other = str(tmp_path / "other.json")
    train_tokenizer(["some other text entirely"] * 20, 300, other)
    for overrides, message in (([f"model.init_from={tmp_path}"], "not a Hugging Face model directory"),
                               ([f"model.init_from={hf_dir}", f"data.tokenizer={other}"], "is not the tokenizer of"),
                               ([f"model.init_from={hf_dir}", "parallel.pipeline=2"], "parallel.pipeline > 1")):
        with pytest.raises(ConfigError, match=message):
            apply_init_from(load_config(None, overrides))


def test_export_errors_are_one_line(tmp_path, capsys):
    from megapile.cli import main

    assert main(["export-hf", "--checkpoint", str(tmp_path / "nope"), "--output", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("megapile: error: ") and err.count("\n") == 1
    assert main(["export-hf", "--checkpoint", str(tmp_path), "--output", str(tmp_path / "o"), "--max-shard-size",
                 "lots"]) == 1
    assert "--max-shard-size" in capsys.readouterr().err
