"""Evaluation: windows as the LM Evaluation Harness makes them, bits per byte on a hand-checkable example,
NLL against F.cross_entropy, jsonl vs preprocessed input, the CLI's table and JSON, 2 ranks vs 1, and
`lm_eval` itself on an exported model agreeing with `megapile eval`."""
from __future__ import annotations

import glob
import json
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from harness import run_command, run_ranks

from megapile.config import ModelConfig
from megapile.evaluation.evaluate import OVERALL, bits_per_byte, evaluate, rolling_windows
from megapile.model import build_model


@pytest.fixture(scope="module")
def tok(tokenizer_path):
    from megapile.data.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_path)


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(arch="neox", vocab_size=1024, num_layers=2, hidden_size=64, num_heads=4, max_seq_len=64)
    return build_model(cfg, seed=3).eval()


@pytest.fixture(scope="module")
def hf_dir(model, tok, tmp_path_factory):
    from megapile.hf.export import write_hf_dir

    out = str(tmp_path_factory.mktemp("eval_hf"))
    write_hf_dir(model.cfg, model.state_dict(), tok, out)
    return out


@pytest.fixture(scope="module")
def docs_jsonl(sample_corpus, tmp_path_factory) -> str:
    """The first 8 validation documents as plain jsonl (what lm_eval's json loader reads)."""
    from megapile.data.reader import JsonlSource

    path = str(tmp_path_factory.mktemp("eval_docs") / "docs.jsonl")
    with open(path, "w") as f:
        for i, doc in enumerate(JsonlSource(os.path.join(sample_corpus, "val", "*.jsonl.zst"))):
            if i == 8:
                break
            f.write(json.dumps({"text": doc.text, "meta": {"pile_set_name": doc.component}}) + "\n")
    return path


@pytest.mark.parametrize("n,seq_len,stride", [(1, 8, 8), (8, 8, 8), (9, 8, 8), (50, 8, 8), (50, 8, 3), (50, 8, 1),
                                              (7, 16, 4)])
def test_windows_are_the_harness_rolling_windows(n, seq_len, stride):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    tokens = list(range(100, 100 + n))
    eod = 0
    inputs = [eod] + tokens[:-1]
    ours = [(inputs[a:b], tokens[b - k : b]) for a, b, k in rolling_windows(n, seq_len, stride)]
    theirs = []
    for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
            tokens, prefix_token=eod, max_seq_len=seq_len, context_len=seq_len - stride + 1)):
        theirs.append(((context + continuation)[:-1], continuation))
    assert ours == theirs
    scored = [t for _, targets in ours for t in targets]
    assert scored == tokens  # every token exactly once, in order


def test_bits_per_byte_on_a_hand_checkable_example(tok, tmp_path):
    """A model whose logits are all 0 gives every token probability 1/1024: NLL = n ln 1024, so
    bits per byte = 10 n / bytes. "héllo wörld" is 13 UTF-8 bytes (é and ö take 2) and 2 words."""
    cfg = ModelConfig(arch="neox", vocab_size=1024, num_layers=1, hidden_size=32, num_heads=2, max_seq_len=16)
    uniform = build_model(cfg, seed=0).eval()
    with torch.no_grad():
        uniform.head.weight.zero_()
    text = "héllo wörld"
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"text": text, "meta": {"pile_set_name": "Hand"}}) + "\n")
    n = len(tok.encode(text))
    totals = evaluate(uniform, tok, str(data), seq_len=4)  # several windows when n > 4
    m = totals[OVERALL].metrics()
    assert (m["tokens"], m["bytes"], m["words"], m["documents"]) == (n, 13, 2, 1)
    # fp32 logits: log_softmax gives ln 1024 to fp32 precision
    assert m["nll_nats"] == pytest.approx(n * math.log(1024), rel=1e-7)
    assert m["bits_per_byte"] == pytest.approx(10 * n / 13, rel=1e-7)
    assert m["bits_per_byte"] == pytest.approx(bits_per_byte(m["nll_nats"], 13), rel=1e-15)
    assert m["perplexity"] == pytest.approx(1024, rel=1e-6)
    assert m["byte_perplexity"] == pytest.approx(2 ** (10 * n / 13), rel=1e-6)
    assert totals["Hand"].metrics() == m


def test_nll_equals_cross_entropy_of_the_document(model, tok, tmp_path):
    text = "The Pile is an 825 GiB diverse, open source language modelling data set."
    tokens = tok.encode(text)
    assert len(tokens) < 64
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": text}) + "\n")
    with torch.no_grad():
        logits = model(torch.tensor([[tok.eod_id] + tokens[:-1]]))[0, :, :1024]
        expected = F.cross_entropy(logits.double(), torch.tensor(tokens), reduction="sum").item()
    totals = evaluate(model, tok, str(data))
    assert totals[OVERALL].nll == pytest.approx(expected, rel=1e-6)
    assert list(totals) == [OVERALL, "unknown"]
    # Windows of 8 tokens see less context, so the loss rises; sliding ones (stride 2) recover part of it.
    short = evaluate(model, tok, str(data), seq_len=8)[OVERALL]
    sliding = evaluate(model, tok, str(data), seq_len=8, stride=2)[OVERALL]
    assert short.tokens == sliding.tokens == len(tokens)
    assert short.nll != expected and sliding.nll != short.nll


def test_preprocessed_dataset_scores_like_its_jsonl(model, tok, sample_corpus, preprocessed):
    jsonl = evaluate(model, tok, os.path.join(sample_corpus, "val", "*.jsonl.zst"), max_docs=5, seq_len=32)
    pre = evaluate(model, tok, preprocessed["valid"], max_docs=5, seq_len=32)
    a, b = jsonl[OVERALL], pre[OVERALL]
    assert (a.documents, a.tokens, a.bytes, a.words) == (b.documents, b.tokens, b.bytes, b.words)
    assert a.nll == pytest.approx(b.nll, rel=1e-9)


def test_cli_table_and_json(hf_dir, sample_corpus, tmp_path, capsys):
    from megapile.cli import main

    out = tmp_path / "results.json"
    data = os.path.join(sample_corpus, "val", "*.jsonl.zst")
    assert main(["eval", "--checkpoint", hf_dir, "--data", data, "--per-component", "--max-docs", "6",
                 "--seq-len", "32", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["seq_len"] == result["stride"] == 32 and result["overall"]["documents"] == 6
    components = result["components"]
    assert components and all(name in printed for name in components) and "bits/byte" in printed
    for key in ("documents", "tokens", "bytes", "words"):
        assert sum(c[key] for c in components.values()) == result["overall"][key]
    assert sum(c["nll_nats"] for c in components.values()) == pytest.approx(result["overall"]["nll_nats"], rel=1e-12)
    assert main(["eval", "--checkpoint", hf_dir, "--data", str(tmp_path / "missing.jsonl")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("megapile: error: ") and err.count("\n") == 1


def _env() -> dict:
    """Extra variables for the test processes (harness.process_env adds them to os.environ): offline hubs."""
    return dict(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


@pytest.mark.slow
def test_two_ranks_equal_one_and_bf16_is_close(hf_dir, docs_jsonl, tmp_path):
    """Documents split over 2 ranks score exactly as on one; `--dtype bf16` (2 ranks too), whose weights and compute
    take half the memory, scores within bf16's rounding of fp32."""
    results = {}
    for nproc, dtype in ((1, "fp32"), (2, "fp32"), (2, "bf16")):
        out = str(tmp_path / f"r{nproc}{dtype}.json")
        # the same launcher for 1 rank too: it is not what differs between the results
        run_ranks("ranks", nproc, ["-m", "megapile.cli", "eval", "--checkpoint", hf_dir, "--data", docs_jsonl,
                                      "--per-component", "--seq-len", "32", "--output", out, "--dtype", dtype],
                  tmp_path / "logs", timeout=300, env=_env())
        results[nproc, dtype] = json.load(open(out))
    one, two, half = results[1, "fp32"], results[2, "fp32"], results[2, "bf16"]
    assert two["world_size"] == 2 and half["dtype"] == "bf16"
    for name in [OVERALL] + list(one["components"]):
        a, b, c = (r[OVERALL] if name == OVERALL else r["components"][name] for r in (one, two, half))
        for key in ("documents", "tokens", "bytes", "words"):
            assert a[key] == b[key] == c[key], (name, key)
        for key in ("nll_nats", "loss", "bits_per_byte", "perplexity"):
            assert a[key] == pytest.approx(b[key], rel=1e-6), (name, key)
            assert c[key] != a[key] and c[key] == pytest.approx(a[key], rel=2e-2), (name, key, c[key], a[key])


def test_lm_eval_harness_agrees(hf_dir, docs_jsonl, model, tok, tmp_path):
    """`lm_eval --model hf` on the exported model, a task defined from a local file, offline."""
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    (task_dir / "local_ppl.yaml").write_text(f"""task: megapile_local_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs_jsonl}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
metadata:
  version: 1.0
""")
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
           f"pretrained={hf_dir},max_length=32,dtype=float32", "--tasks", "megapile_local_ppl", "--include_path",
           str(task_dir), "--device", "cpu", "--batch_size", "4", "--output_path", str(tmp_path / "out")]
    run_command(cmd, tmp_path / "logs", timeout=300, cwd=str(tmp_path),
                env=dict(_env(), HF_DATASETS_CACHE=str(tmp_path / "datasets_cache")))
    (results_file,) = glob.glob(str(tmp_path / "out" / "**" / "results_*.json"), recursive=True)
    theirs = json.load(open(results_file))["results"]["megapile_local_ppl"]
    ours = evaluate(model, tok, docs_jsonl, seq_len=32)[OVERALL].metrics()
    assert theirs["bits_per_byte,none"] == pytest.approx(ours["bits_per_byte"], rel=1e-5)
    assert theirs["byte_perplexity,none"] == pytest.approx(ours["byte_perplexity"], rel=1e-5)
    assert theirs["word_perplexity,none"] == pytest.approx(ours["word_perplexity"], rel=1e-4)
