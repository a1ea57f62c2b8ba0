"""The three data commands end to end through `megapile.cli.main`, and their one-line errors."""
from __future__ import annotations

import json
import os

import pytest

from megapile.cli import main
from megapile.data.indexed import IndexedDataset
from megapile.data.samples import build_samples


def test_sample_tokenizer_preprocess_end_to_end(tmp_path, capsys):
    corpus, tok, data = tmp_path / "corpus", tmp_path / "tok" / "tokenizer.json", tmp_path / "data"
    assert main(["data", "sample", str(corpus), "--max-mb", "1"]) == 0
    assert sorted(os.listdir(corpus)) == ["manifest.json", "test", "train", "val"]
    train_glob = str(corpus / "train" / "*.jsonl.zst")
    assert main(["tokenizer", "train", "--input", train_glob, "--vocab-size", "512", "--output", str(tok)]) == 0
    assert "vocab_size=512 eod_id=0 pad_id=1" in capsys.readouterr().out
    data.mkdir()
    args = ["preprocess", "--input", train_glob, "--tokenizer", str(tok), "--output-prefix", str(data / "pile"), "--workers", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "documents" in out and "tokens" in out and "skipped 0 documents" in out
    assert main(args + ["--split-by-component"]) == 0
    names = sorted(os.listdir(data))
    assert {"pile.bin", "pile.idx", "pile.json", "pile_Github.bin", "pile_Github.idx", "pile_Github.json"} <= set(names)
    whole = IndexedDataset(str(data / "pile"))
    parts = [IndexedDataset(str(data / n[:-4])) for n in names if n.startswith("pile_") and n.endswith(".idx")]
    assert sum(len(p) for p in parts) == len(whole) and sum(p.num_tokens for p in parts) == whole.num_tokens
    assert json.load(open(data / "pile.json"))["tokenizer"]["vocab_size"] == 512
    stream = build_samples([str(data / "pile_Github"), str(data / "pile_Docstrings")], [0.8, 0.2], seq_len=32, seed=0)
    assert stream.get_batch(0, 4).shape == (4, 33)


def _one_line_error(capsys, needle: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("megapile: error: ") and needle in err[0], err


def test_command_errors_are_one_line_and_exit_1(sample_corpus, tokenizer_path, tmp_path, capsys):
    val = os.path.join(sample_corpus, "val", "*.jsonl.zst")
    pre = ["preprocess", "--tokenizer", tokenizer_path, "--workers", "1"]
    assert main(pre + ["--input", str(tmp_path / "*.zst"), "--output-prefix", str(tmp_path / "p")]) == 1
    _one_line_error(capsys, "no files match")
    assert main(pre + ["--input", val, "--output-prefix", str(tmp_path / "nodir" / "p")]) == 1
    _one_line_error(capsys, "output directory")
    broken = tmp_path / "broken.jsonl.zst"
    data = open(os.path.join(sample_corpus, "val", "00.jsonl.zst"), "rb").read()
    broken.write_bytes(data[: len(data) // 3])
    assert main(pre + ["--input", str(broken), "--output-prefix", str(tmp_path / "p")]) == 1
    _one_line_error(capsys, "broken.jsonl.zst: truncated zstd stream")
    bad_tok = tmp_path / "bad.json"
    bad_tok.write_text("nope")
    assert main(["preprocess", "--input", val, "--tokenizer", str(bad_tok), "--output-prefix", str(tmp_path / "p")]) == 1
    _one_line_error(capsys, "bad.json")
    assert main(["tokenizer", "train", "--input", str(tmp_path / "none*.zst"), "--vocab-size", "300", "--output", str(tmp_path / "t.json")]) == 1
    _one_line_error(capsys, "no files match")
    assert main(["data", "sample", str(tmp_path / "c"), "--max-mb", "0"]) == 1
    _one_line_error(capsys, "--max-mb")
    assert sorted(os.listdir(tmp_path)) == ["bad.json", "broken.jsonl.zst"]


def test_strict_preprocess_stops_at_the_first_bad_line(tokenizer_path, tmp_path, capsys):
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "fine"}\n{"text": null}\n')
    assert main(["preprocess", "--input", str(path), "--tokenizer", tokenizer_path, "--output-prefix", str(tmp_path / "o"), "--workers", "1", "--strict"]) == 1
    _one_line_error(capsys, "x.jsonl:2: no \"text\" field")
    assert main(["preprocess", "--input", str(path), "--tokenizer", tokenizer_path, "--output-prefix", str(tmp_path / "o"), "--workers", "1"]) == 0
    assert f"missing_text (no \"text\" field): 1 at {path}:2" in capsys.readouterr().out


def test_preprocess_from_a_datasets_source_equals_the_jsonl_reader(sample_corpus, tokenizer_path, tmp_path, capsys):
    """--hf-dataset: the same documents through `datasets` give byte-identical files, per component too (the
    component read from the nested meta.pile_set_name, as the Pile's own layout has it)."""
    val = os.path.join(sample_corpus, "val", "00.jsonl.zst")
    common = ["--tokenizer", tokenizer_path, "--workers", "1", "--split-by-component"]
    assert main(["preprocess", "--input", val, "--output-prefix", str(tmp_path / "a")] + common) == 0
    hf = ["preprocess", "--hf-dataset", "json", "--hf-data-files", val, "--hf-cache-dir", str(tmp_path / "cache")]
    assert main(hf + ["--component-column", "meta.pile_set_name", "--output-prefix", str(tmp_path / "b")] + common) == 0
    capsys.readouterr()
    made = sorted(n[1:] for n in os.listdir(tmp_path) if n.startswith("a_") and n.endswith((".bin", ".idx")))
    assert len(made) >= 4  # two components or more, .bin and .idx each
    for name in made:
        assert open(tmp_path / ("a" + name), "rb").read() == open(tmp_path / ("b" + name), "rb").read(), name
    assert main(hf + ["--text-column", "body", "--tokenizer", tokenizer_path, "--output-prefix", str(tmp_path / "c")]) == 1
    _one_line_error(capsys, "no column 'body'")
    assert main(["preprocess", "--hf-dataset", "json", "--hf-data-files", str(tmp_path / "none.jsonl"),
                 "--hf-cache-dir", str(tmp_path / "cache"), "--tokenizer", tokenizer_path,
                 "--output-prefix", str(tmp_path / "d")]) == 1
    _one_line_error(capsys, "--hf-dataset json")


@pytest.mark.parametrize("argv", [["data"], ["tokenizer"]])
def test_subcommand_is_required(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
