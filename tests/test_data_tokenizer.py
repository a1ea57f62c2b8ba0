"""Tokenizer: the trained BPE, the formats load_tokenizer accepts, and unloadable files."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from megapile.data import DataError
from megapile.data.tokenizer import load_tokenizer, train_tokenizer

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "Unicode survives: na\u00efve caf\u00e9 \u2603 \U0001f600 \u4e2d\u6587",
    "   leading spaces, tabs\tand\r\nnewlines  ",
    "<|endoftext|> is one token when written out",
]


def test_trained_tokenizer_is_neox_style(tokenizer_path):
    tok = load_tokenizer(tokenizer_path)
    assert tok.vocab_size == 1024
    assert (tok.eod_id, tok.pad_id) == (0, 1)  # <|endoftext|>, <|padding|>
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text  # byte-level: lossless
        assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]
    assert tok.encode("<|endoftext|>") == [0]
    assert len(tok.fingerprint) == 64


def test_directory_and_hf_save_pretrained_load_the_same(tokenizer_path, tmp_path):
    from transformers import PreTrainedTokenizerFast

    ref = load_tokenizer(tokenizer_path)
    d = tmp_path / "plain"
    d.mkdir()
    shutil.copy(tokenizer_path, d / "tokenizer.json")
    assert load_tokenizer(str(d)).encode_batch(TEXTS) == ref.encode_batch(TEXTS)
    hf_dir = tmp_path / "hf"
    PreTrainedTokenizerFast(tokenizer_file=tokenizer_path, eos_token="<|endoftext|>").save_pretrained(str(hf_dir))
    hf = load_tokenizer(str(hf_dir))
    assert hf.encode_batch(TEXTS) == ref.encode_batch(TEXTS)
    assert (hf.vocab_size, hf.eod_id) == (ref.vocab_size, ref.eod_id)


@pytest.mark.parametrize("names", [("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")])
def test_gpt2_style_vocab_and_merges(tokenizer_path, tmp_path, names):
    from tokenizers import Tokenizer as Backend

    ref = load_tokenizer(tokenizer_path)
    vocab_file, merges_file = Backend.from_file(tokenizer_path).model.save(str(tmp_path))
    os.rename(vocab_file, tmp_path / names[0])
    os.rename(merges_file, tmp_path / names[1])
    for path in (str(tmp_path), str(tmp_path / names[0])):
        tok = load_tokenizer(path)
        assert tok.encode_batch(TEXTS[:3]) == ref.encode_batch(TEXTS[:3])
        assert tok.eod_id == ref.eod_id == 0
        assert len(tok.files) == 2 and tok.fingerprint != ref.fingerprint


def test_fingerprint_is_the_file_hash(tokenizer_path, tmp_path):
    import hashlib

    tok = load_tokenizer(tokenizer_path)
    assert tok.fingerprint == hashlib.sha256(open(tokenizer_path, "rb").read()).hexdigest()


def test_train_refuses_tiny_vocab_and_writes_atomically(tmp_path):
    with pytest.raises(DataError, match="at least 258"):
        train_tokenizer(TEXTS, 100, tmp_path / "t.json")
    tok = train_tokenizer(TEXTS * 20, 300, tmp_path / "sub" / "t.json")
    assert tok.vocab_size <= 300 and os.listdir(tmp_path / "sub") == ["t.json"]


@pytest.mark.parametrize(
    "content,match",
    [
        (b"", "cannot load tokenizer"),
        (b"{not json", "cannot load tokenizer"),
        (json.dumps({"model": {"type": "Nope"}}).encode(), "cannot load tokenizer"),
    ],
)
def test_unloadable_tokenizer_is_a_one_line_error(tmp_path, content, match):
    path = tmp_path / "tokenizer.json"
    path.write_bytes(content)
    with pytest.raises(DataError, match=match) as e:
        load_tokenizer(str(path))
    assert "\n" not in str(e.value) and "tokenizer.json" in str(e.value)


def test_missing_tokenizer_and_empty_directory(tmp_path):
    with pytest.raises(DataError, match="tokenizer not found"):
        load_tokenizer(str(tmp_path / "nope.json"))
    with pytest.raises(DataError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path))


def test_tokenizer_without_end_of_document_token(tmp_path):
    from tokenizers import Tokenizer as Backend
    from tokenizers import models

    path = str(tmp_path / "t.json")
    Backend(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(path)
    with pytest.raises(DataError, match="end-of-document"):
        load_tokenizer(path)
