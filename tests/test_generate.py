"""Generation: the KV cache against full recomputation, greedy decoding against transformers' generate,
batches of prompts of different lengths against one at a time, sampling reproducible by seed, the CLI, and
`--tensor-parallel 2` on two ranks writing what one process writes."""
from __future__ import annotations

import subprocess

import pytest
import torch

from megapile.config import ModelConfig
from megapile.evaluation.generate import generate, sample_next
from megapile.model import KVCache, build_model

ARCHS = ["neox", "gpt2", "llama", "qwen2"]


def random_model(arch: str, seed: int = 0):
    """A random model with large weights, so greedy decoding writes varied tokens, not one repeated; the
    grouped-query families' (llama, qwen2) have 4 query heads over 2 cached key/value heads."""
    gqa = dict(num_kv_heads=2, intermediate_size=160) if ModelConfig(arch=arch).family.grouped_query else {}
    cfg = ModelConfig(arch=arch, vocab_size=1024, num_layers=2, hidden_size=64, num_heads=4, max_seq_len=64,
                      init_std=0.3, **gqa)
    return build_model(cfg, seed=seed).eval()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, tokenizer_path):
    from megapile.data.tokenizer import load_tokenizer
    from megapile.hf.export import write_hf_dir

    tok = load_tokenizer(tokenizer_path)
    out = {}
    for arch in ARCHS:
        model = random_model(arch)
        out[arch] = str(tmp_path_factory.mktemp(f"gen_{arch}"))
        write_hf_dir(model.cfg, model.state_dict(), tok, out[arch])
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_cache_logits_equal_full_forward(arch):
    model = random_model(arch)
    ids = torch.randint(0, 1024, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.cfg, 2, 24)
        pieces = [model.forward_cached(ids[:, :9], cache)] + [model.forward_cached(ids[:, i : i + 1], cache)
                                                               for i in range(9, 20)]
    assert (torch.cat(pieces, dim=1) - full).abs().max() < 1e-4
    # Left padding: row 1 is 6 padding tokens then the first 14 tokens of row 0; its logits are row 0's.
    padded = torch.cat([torch.zeros(1, 6, dtype=torch.long), ids[:1, :14]], dim=1)
    with torch.no_grad():
        out = model.forward_cached(torch.cat([ids[:1], padded]), KVCache(model.cfg, 2, 20, pad=torch.tensor([0, 6])))
    assert (out[1, 6:] - full[0, :14]).abs().max() < 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_transformers_generate_with_and_without_cache(arch, hf_dirs):
    import transformers

    from megapile.hf.export import load_model

    loaded = load_model(hf_dirs[arch])
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs[arch], dtype=torch.float32).eval()
    prompt = loaded.tokenizer.encode("The Pile is a large dataset")
    ours = generate(loaded.model, [prompt], 30)[0]
    assert ours == generate(loaded.model, [prompt], 30, use_cache=False)[0]
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False, eos_token_id=None,
                         pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == theirs
    assert len(set(ours)) >= 5, ours  # a real sequence, not one token repeated


@pytest.mark.parametrize("use_cache", [True, False])
def test_batch_of_different_lengths_equals_one_at_a_time(use_cache):
    model = random_model("neox")
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    batch = generate(model, prompts, 12, use_cache=use_cache)
    assert batch == [generate(model, [p], 12)[0] for p in prompts]


def test_sampling_reproducible_by_seed():
    model = random_model("gpt2")
    kwargs = dict(temperature=0.8, top_k=50, top_p=0.95)
    a = generate(model, [[1, 2, 3], [4, 5]], 20, seed=7, **kwargs)
    assert a == generate(model, [[1, 2, 3], [4, 5]], 20, seed=7, **kwargs)
    assert a != generate(model, [[1, 2, 3], [4, 5]], 20, seed=8, **kwargs)
    assert a == generate(model, [[1, 2, 3], [4, 5]], 20, seed=7, use_cache=False, **kwargs)


def test_sample_next_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, 0.0, 0, 1.0, g).tolist() == [1]
    assert {int(sample_next(logits, 1.0, 1, 1.0, g)) for _ in range(20)} == {1}  # top-1
    assert {int(sample_next(logits, 1.0, 0, 0.01, g)) for _ in range(20)} == {1}  # tiny nucleus: the top token
    assert {int(sample_next(logits, 5.0, 2, 1.0, g)) for _ in range(200)} == {1, 3}  # top-2
    # softmax([3, 2, 1, 0]) = .64 .24 .09 .03: top-p 0.8 keeps the first two (0.64 < 0.8 <= 0.88)
    assert {int(sample_next(logits, 1.0, 0, 0.8, g)) for _ in range(300)} == {1, 3}


def test_stops_at_end_of_document():
    model = random_model("neox")
    first = generate(model, [[3, 4, 5]], 5)[0]
    assert len(first) == 5
    assert generate(model, [[3, 4, 5]], 5, eod_id=first[1])[0] == first[:2]  # the EOD token ends the row
    rows = generate(model, [[3, 4, 5], [9, 8]], 5, eod_id=first[1])
    assert rows[0] == first[:2] and rows[1] == generate(model, [[9, 8]], 5, eod_id=first[1])[0]


def test_cli_streams_one_prompt_and_prints_a_batch(hf_dirs, capsys):
    from megapile.cli import main

    assert main(["generate", "--checkpoint", hf_dirs["neox"], "--prompt", "The Pile is", "--max-new-tokens", "8",
                 "--temperature", "0.8", "--top-p", "0.95", "--seed", "1"]) == 0
    streamed = capsys.readouterr().out
    assert streamed.startswith("The Pile is") and len(streamed) > len("The Pile is\n")
    assert main(["generate", "--checkpoint", hf_dirs["neox"], "--prompt", "The Pile is", "--max-new-tokens", "8",
                 "--temperature", "0.8", "--top-p", "0.95", "--seed", "1", "--no-cache"]) == 0
    assert capsys.readouterr().out == streamed  # same seed, with or without the cache
    assert main(["generate", "--checkpoint", hf_dirs["gpt2"], "--prompt", "a", "--prompt", "b c", "--temperature",
                 "0", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "--- [0] a" in out and "--- [1] b c" in out


def test_cli_errors_are_one_line(hf_dirs, tmp_path, capsys):
    from megapile.cli import main

    assert main(["generate", "--checkpoint", hf_dirs["neox"], "--prompt", "x", "--max-new-tokens", "100"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("megapile: error: ") and "context of 64 tokens" in err and err.count("\n") == 1
    assert main(["generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("megapile: error: ") and err.count("\n") == 1


def test_cli_empty_prompt_starts_a_new_document(hf_dirs, capsys):
    """--prompt "" generates from the end-of-document token, as the model saw every document start in training:
    greedy, it writes what the model continues [eod] with."""
    from megapile.cli import main
    from megapile.data.tokenizer import load_tokenizer
    from megapile.hf.convert import load_hf_dir

    assert main(["generate", "--checkpoint", hf_dirs["neox"], "--prompt", "", "--temperature", "0",
                 "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    tok = load_tokenizer(hf_dirs["neox"])
    cfg, weights = load_hf_dir(hf_dirs["neox"])
    model = build_model(cfg, seed=0)
    model.load_state_dict(weights)
    expected = generate(model.eval(), [[tok.eod_id]], 6, eod_id=tok.eod_id)[0]
    assert out == tok.decode(expected) + "\n" and expected


def _generate_over_two_ranks(hf_dir: str, args: list[str], logs) -> subprocess.CompletedProcess:
    from harness import run_ranks

    return run_ranks("ranks", 2, ["-m", "megapile.cli", "generate", "--tensor-parallel", "2", "--checkpoint", hf_dir,
                                     *args], logs, timeout=300, check=False)


@pytest.mark.slow
@pytest.mark.parametrize("cache", [[], ["--no-cache"]], ids=["cache", "no-cache"])
def test_tensor_parallel_generate_writes_what_one_process_writes(hf_dirs, capsys, cache, tmp_path):
    """Qwen2 (grouped-query: 2 key/value heads, one per rank, with q/k/v biases) split over 2 gloo ranks: greedy
    tokens for a batch of prompts of different lengths, and seeded sampled tokens streamed for one prompt, are
    one process's, and only rank 0 prints. Each rank's cache holds its one key/value head (`GPT.kv_cache`)."""
    from megapile.cli import main

    runs = {
        "greedy": ["--prompt", "The Pile is", "--prompt", "a", "--temperature", "0", "--max-new-tokens", "20"],
        "sampled": ["--prompt", "The Pile is", "--temperature", "0.9", "--top-k", "40", "--seed", "3",
                    "--max-new-tokens", "20"],
    }
    for name, args in runs.items():
        assert main(["generate", "--checkpoint", hf_dirs["qwen2"], *args, *cache]) == 0
        expected = capsys.readouterr().out
        assert expected.count("\n") == (2 if name == "greedy" else 1) and len(expected) > 30, expected
        proc = _generate_over_two_ranks(hf_dirs["qwen2"], args + cache, tmp_path / f"logs-{name}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert expected in proc.stdout, (name, proc.stdout[-2000:], expected)
        assert proc.stdout.count(expected.splitlines()[0]) == 1, proc.stdout  # rank 1 printed nothing


def test_tensor_parallel_needs_as_many_processes(hf_dirs, capsys):
    from megapile.cli import main

    assert main(["generate", "--checkpoint", hf_dirs["qwen2"], "--prompt", "x", "--tensor-parallel", "2"]) == 1
    err = capsys.readouterr().err
    assert err == "megapile: error: --tensor-parallel 2 needs exactly 2 processes (torchrun --nproc_per_node 2), got 1\n"


def test_a_split_model_caches_only_its_own_key_value_heads():
    from megapile.parallel.tensor_inference import build_split, cut

    whole = random_model("llama")
    split = build_split(whole.cfg, cut(dict(whole.state_dict()), 2, 1), 2, None, torch.device("cpu"), torch.float32)
    assert whole.kv_cache(3, 10).keys[0].shape == (3, 2, 10, whole.cfg.head_dim)
    assert split.kv_cache(3, 10).keys[0].shape == (3, 1, 10, whole.cfg.head_dim)
