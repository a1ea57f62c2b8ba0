"""Preprocess: documents -> .bin/.idx round trip, split by component, sidecar, bad input, atomicity."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import zstandard

from megapile.data import DataError
from megapile.data.indexed import IndexedDataset
from megapile.data.preprocess import component_prefix, preprocess
from megapile.data.reader import HFSource, JsonlSource
from megapile.data.tokenizer import load_tokenizer


def _expected(docs, tok) -> list[list[int]]:
    return [tok.encode(d.text) + [tok.eod_id] for d in docs]


def test_round_trip_with_workers_matches_encode_plus_eod(sample_corpus, tokenizer_path, tmp_path):
    tok = load_tokenizer(tokenizer_path)
    pattern = os.path.join(sample_corpus, "train", "*.jsonl.zst")
    prefix = str(tmp_path / "pile")
    result = preprocess(pattern, tokenizer_path, prefix, workers=2, chunk_bytes=64 << 10)  # many chunks, 2 processes
    docs = list(JsonlSource(pattern))
    ds = IndexedDataset(prefix)
    assert ds.dtype == np.uint16 and len(ds) == len(docs) == result.documents
    for i, want in enumerate(_expected(docs, tok)):
        assert ds[i].tolist() == want, f"document {i} differs"
    assert result.tokens == ds.num_tokens and result.skips.total == 0
    side = json.load(open(prefix + ".json"))
    assert side["tokenizer"]["sha256"] == tok.fingerprint
    assert side["documents"] == len(docs) and side["tokens"] == ds.num_tokens
    assert [s["path"] for s in side["sources"]] == [os.path.abspath(p) for p in JsonlSource(pattern).paths]
    assert sorted(os.listdir(tmp_path)) == ["pile.bin", "pile.idx", "pile.json"]


def test_megatron_core_reads_the_preprocessed_dataset(preprocessed, tokenizer_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset as MDataset
    m, ours = MDataset(preprocessed["valid"]), IndexedDataset(preprocessed["valid"])
    assert len(m) == len(ours) > 0
    eod = load_tokenizer(tokenizer_path).eod_id
    for i in range(len(ours)):
        assert np.array_equal(m[i], ours[i]) and ours[i][-1] == eod


def test_split_by_component_and_filter(sample_corpus, tokenizer_path, tmp_path):
    tok = load_tokenizer(tokenizer_path)
    pattern = os.path.join(sample_corpus, "val", "*.jsonl.zst")
    docs = list(JsonlSource(pattern))
    prefix = str(tmp_path / "pile")
    result = preprocess(pattern, tok, prefix, split_by_component=True, progress=True)  # with a tqdm bar
    components = sorted({d.component for d in docs})
    assert sorted(result.outputs) == components
    for comp in components:
        ds = IndexedDataset(component_prefix(prefix, comp))
        want = _expected([d for d in docs if d.component == comp], tok)
        assert [ds[i].tolist() for i in range(len(ds))] == want
        sidecar = json.load(open(component_prefix(prefix, comp) + ".json"))
        assert sidecar["component"] == comp and sidecar["tokens"] == sum(len(t) for t in want)
        # the denominator of bits per byte: the UTF-8 bytes of the component's documents
        assert sidecar["text_bytes"] == sum(len(d.text.encode("utf-8")) for d in docs if d.component == comp)
    only = preprocess(pattern, tok, str(tmp_path / "gh"), components=["Github"])
    assert only.documents == sum(d.component == "Github" for d in docs)
    assert only.filtered == len(docs) - only.documents
    assert component_prefix("d/p", "Gutenberg (PG-19)") == "d/p_Gutenberg_PG-19"


def test_hf_dataset_source_gives_identical_files(sample_corpus, tokenizer_path, tmp_path):
    import datasets

    path = os.path.join(sample_corpus, "val", "00.jsonl.zst")
    preprocess(path, tokenizer_path, str(tmp_path / "a"))
    ds = datasets.load_dataset("json", data_files=path, split="train", cache_dir=str(tmp_path / "hf"))
    preprocess(HFSource(ds), tokenizer_path, str(tmp_path / "b"))
    for ext in (".bin", ".idx"):
        assert open(tmp_path / f"a{ext}", "rb").read() == open(tmp_path / f"b{ext}", "rb").read()


def _zst(path, lines: list[bytes]) -> str:
    with open(path, "wb") as f:
        f.write(zstandard.ZstdCompressor().compress(b"\n".join(lines) + b"\n"))
    return str(path)


def test_bad_documents_are_skipped_counted_and_located(tokenizer_path, tmp_path):
    tok = load_tokenizer(tokenizer_path)
    good = [json.dumps({"text": f"document number {i}. " * 20}).encode() for i in range(4)]
    big_text = "A long document, megabytes of ordinary prose. " * 25_000  # 1.15 MB in one JSON line
    lines = [
        good[0],
        b"{not json",
        b'{"text": 7}',
        b'{"meta": {}}',
        b'{"text": "\xff\xfe bad bytes"}',
        b'{"text": ""}',
        good[1],
        json.dumps({"text": big_text}).encode(),
        good[2],
        b'{"text": "also not json"',
        good[3],
    ]
    path = _zst(tmp_path / "bad.jsonl.zst", lines)
    prefix = str(tmp_path / "out")
    result = preprocess(path, tok, prefix, workers=1)
    assert result.skips.counts == {
        "invalid_json": 2, "text_not_string": 1, "missing_text": 1, "invalid_utf8": 1, "empty_text": 1,
    }
    assert result.skips.examples["invalid_json"] == [f"{path}:2", f"{path}:10"]
    assert result.skips.examples["empty_text"] == [f"{path}:6"]
    ds = IndexedDataset(prefix)
    kept = [json.loads(x)["text"] for x in (good[0], good[1])] + [big_text] + [json.loads(x)["text"] for x in good[2:]]
    assert [ds[i].tolist() for i in range(len(ds))] == [tok.encode(t) + [tok.eod_id] for t in kept]
    summary = "\n".join(result.summary())
    assert "skipped 6 documents" in summary and f"invalid_json (line is not valid JSON): 2 at {path}:2, {path}:10" in summary
    assert json.load(open(prefix + ".json"))["run"]["skipped"]["invalid_utf8"]["first"] == [f"{path}:5"]

    too_long = preprocess(path, tok, str(tmp_path / "short"), max_doc_bytes=1 << 20)
    assert too_long.skips.counts["too_long"] == 1 and too_long.skips.examples["too_long"] == [f"{path}:8"]
    with pytest.raises(DataError, match=r"bad.jsonl.zst:2: line is not valid JSON"):
        preprocess(path, tok, str(tmp_path / "strict"), strict=True)
    assert not any(n.startswith("strict") for n in os.listdir(tmp_path))


@pytest.mark.parametrize("workers", [1, 2])
def test_broken_file_mid_run_leaves_no_dataset(sample_corpus, tokenizer_path, tmp_path, workers):
    good = os.path.join(sample_corpus, "val", "00.jsonl.zst")
    data = open(good, "rb").read()
    broken = tmp_path / "in" / "zz.jsonl.zst"
    broken.parent.mkdir()
    broken.write_bytes(data[: len(data) // 2])  # truncated: ends inside the zstd frame
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DataError, match=r"zz.jsonl.zst: truncated zstd stream .* at compressed byte \d+, after line \d+"):
        preprocess([good, str(broken)], tokenizer_path, str(out / "pile"), workers=workers, chunk_bytes=32 << 10)
    assert os.listdir(out) == []  # neither finished-looking files nor temporaries


def test_user_errors(sample_corpus, tokenizer_path, tmp_path):
    pattern = os.path.join(sample_corpus, "val", "*.jsonl.zst")
    with pytest.raises(DataError, match="output directory .*missing.* does not exist"):
        preprocess(pattern, tokenizer_path, str(tmp_path / "missing" / "pile"))
    bad_tok = tmp_path / "tok.json"
    bad_tok.write_text("{]")
    with pytest.raises(DataError, match="cannot load tokenizer .*tok.json"):
        preprocess(pattern, str(bad_tok), str(tmp_path / "pile"))
    with pytest.raises(DataError, match="no files match"):
        preprocess(str(tmp_path / "*.jsonl.zst"), tokenizer_path, str(tmp_path / "pile"))
    assert sorted(os.listdir(tmp_path)) == ["tok.json"]


def test_a_dead_worker_is_an_error_not_a_hang(sample_corpus, tokenizer_path, tmp_path):
    from concurrent.futures.process import BrokenProcessPool

    copy = tmp_path / "tok.json"
    copy.write_bytes(open(tokenizer_path, "rb").read())
    tok = load_tokenizer(str(copy))
    copy.unlink()  # the workers cannot load it: their start-up fails
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(BrokenProcessPool):
        preprocess(os.path.join(sample_corpus, "val", "*.jsonl.zst"), tok, str(out / "pile"), workers=2)
    assert os.listdir(out) == []
