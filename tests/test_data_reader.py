"""Reader: the three file formats, component filter, the HF source, and every kind of bad input."""
from __future__ import annotations

import gzip
import json
import os
import tracemalloc

import pytest
import zstandard

from megapile.data import DataError
from megapile.data.reader import HFSource, JsonlSource, expand_inputs, iter_lines

DOCS = [
    {"text": "def f():\n    return 1\n", "meta": {"pile_set_name": "Github"}},
    {"text": "Unicode: na\u00efve caf\u00e9 \u2603 \U0001f600", "meta": {"pile_set_name": "Docs"}},
    {"text": "third", "meta": {"pile_set_name": "Github"}},
]


def _jsonl(records) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def write(path, data: bytes) -> str:
    path = str(path)
    if path.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    elif path.endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    with open(path, "wb") as f:
        f.write(data)
    return path


@pytest.mark.parametrize("name", ["a.jsonl", "a.jsonl.gz", "a.jsonl.zst"])
def test_formats_give_the_same_documents(tmp_path, name):
    src = JsonlSource(write(tmp_path / name, _jsonl(DOCS)))
    docs = list(src)
    assert [d.text for d in docs] == [r["text"] for r in DOCS]
    assert [d.component for d in docs] == ["Github", "Docs", "Github"]
    assert docs[1].location.endswith(f"{name}:2")
    assert src.skips.total == 0


def test_multi_frame_zstd_and_no_trailing_newline(tmp_path):
    c = zstandard.ZstdCompressor()
    data = c.compress(_jsonl(DOCS[:2])) + c.compress(json.dumps(DOCS[2]).encode())  # two frames, no final \n
    path = tmp_path / "multi.jsonl.zst"
    path.write_bytes(data)
    assert [d.text for d in JsonlSource(str(path))] == [r["text"] for r in DOCS]


def test_component_filter(tmp_path):
    src = JsonlSource(write(tmp_path / "a.jsonl.zst", _jsonl(DOCS)), components=["Github"])
    assert [d.text for d in src] == [DOCS[0]["text"], DOCS[2]["text"]]
    assert src.filtered == 1


def test_hf_dataset_source_matches_jsonl(tmp_path):
    import datasets

    path = write(tmp_path / "a.jsonl", _jsonl(DOCS + [{"text": "", "meta": {}}]))
    ds = datasets.load_dataset("json", data_files=path, split="train", cache_dir=str(tmp_path / "hf"))
    hf = HFSource(ds, name="a")
    assert [d.text for d in hf] == [r["text"] for r in DOCS]
    assert hf.skips.counts == {"empty_text": 1} and hf.skips.examples["empty_text"] == ["a:3"]
    with pytest.raises(DataError, match="no column 'body'"):
        HFSource(ds, text_column="body")


def test_lines_are_streamed_in_constant_memory(tmp_path):
    # 40 MB of JSON lines decompressed through the reader without holding more than a few MB,
    # although the data compresses 1000:1 and more
    line = json.dumps({"text": "x" * 4000}).encode() + b"\n"
    c = zstandard.ZstdCompressor()
    path = tmp_path / "big.jsonl.zst"
    with open(path, "wb") as f, c.stream_writer(f) as w:
        for _ in range(10_000):
            w.write(line)
    tracemalloc.start()
    n = sum(1 for _ in iter_lines(str(path)))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n == 10_000
    assert peak < 8 << 20, f"peak {peak / 2**20:.1f} MB"


# ---- bad input -------------------------------------------------------------------------------

BAD_LINES = [
    (b"this is not json", "invalid_json"),
    (b'{"meta": {}}', "missing_text"),
    (b'{"text": 42}', "text_not_string"),
    (b'{"text": ""}', "empty_text"),
    (b'{"text": "caf\xe9 latin-1 bytes"}', "invalid_utf8"),
    (b'{"text": "lone surrogate \\ud800 here"}', "invalid_utf8"),
    (b"[1, 2]", "missing_text"),
    (b"", "blank_line"),
]


@pytest.mark.parametrize("line,reason", BAD_LINES, ids=[r for _, r in BAD_LINES])
def test_bad_documents_are_skipped_and_counted_with_their_line(tmp_path, line, reason):
    data = _jsonl(DOCS[:1]) + line + b"\n" + _jsonl(DOCS[1:])
    path = write(tmp_path / "bad.jsonl.zst", data)
    src = JsonlSource(path)
    assert [d.text for d in src] == [r["text"] for r in DOCS]
    assert src.skips.counts == {reason: 1}
    assert src.skips.examples[reason] == [f"{path}:2"]
    strict = JsonlSource(path, strict=True)
    with pytest.raises(DataError, match="bad.jsonl.zst:2: "):
        list(strict)


def test_huge_document_is_read_and_too_long_one_skipped_without_holding_it(tmp_path):
    big = "word " * 2_000_000  # 10 MB document
    path = write(tmp_path / "big.jsonl.zst", _jsonl([DOCS[0], {"text": big}, DOCS[2]]))
    assert [len(d.text) for d in JsonlSource(path)] == [len(DOCS[0]["text"]), len(big), len(DOCS[2]["text"])]
    src = JsonlSource(path, max_doc_bytes=1 << 20)
    tracemalloc.start()
    texts = [d.text for d in src]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert texts == [DOCS[0]["text"], DOCS[2]["text"]]
    assert src.skips.counts == {"too_long": 1} and src.skips.examples["too_long"] == [f"{path}:2"]
    assert peak < 6 << 20


def test_truncated_zstd_names_file_line_and_offset(tmp_path):
    data = zstandard.ZstdCompressor().compress(_jsonl(DOCS * 2000))
    path = tmp_path / "cut.jsonl.zst"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as e:
        list(JsonlSource(str(path)))
    msg = str(e.value)
    assert "cut.jsonl.zst" in msg and "truncated zstd" in msg and f"compressed byte {len(data) // 2}" in msg
    assert "after line" in msg and "\n" not in msg


@pytest.mark.parametrize("checksum,content_size", [(False, False), (True, True)])
def test_zstd_cut_anywhere_inside_a_frame_is_an_error(tmp_path, checksum, content_size):
    c = zstandard.ZstdCompressor(write_checksum=checksum, write_content_size=content_size)
    first, second = c.compress(_jsonl(DOCS)), c.compress(_jsonl(DOCS[:1]) * 50)
    skippable = (0x184D2A53).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"abc"
    data = first + skippable + second
    boundaries = {0, len(first), len(first) + len(skippable), len(data)}
    path = tmp_path / "cut.jsonl.zst"
    for cut in range(len(data) + 1):
        path.write_bytes(data[:cut])
        if cut in boundaries:
            assert len(list(JsonlSource(str(path)))) == {0: 0, len(data): 53}.get(cut, 3)
        else:
            with pytest.raises(DataError, match="cut.jsonl.zst: (truncated|corrupt) zstd"):
                list(JsonlSource(str(path)))


def test_corrupt_zstd_is_an_error(tmp_path):
    data = bytearray(zstandard.ZstdCompressor().compress(_jsonl(DOCS * 2000)))
    data[200:260] = b"\x00" * 60
    path = tmp_path / "corrupt.jsonl.zst"
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"corrupt.jsonl.zst: corrupt zstd data .* at compressed byte \d+, after line \d+"):
        list(JsonlSource(str(path)))


def test_truncated_gzip_is_an_error(tmp_path):
    data = gzip.compress(_jsonl(DOCS * 2000))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut.jsonl.gz: truncated gzip"):
        list(JsonlSource(str(path)))


def test_missing_file_and_empty_glob(tmp_path):
    with pytest.raises(DataError, match="input file not found: '.*nope.jsonl.zst'"):
        JsonlSource(str(tmp_path / "nope.jsonl.zst"))
    with pytest.raises(DataError, match=r"no files match '.*\*.jsonl.zst'"):
        JsonlSource(str(tmp_path / "*.jsonl.zst"))
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match="no .jsonl"):
        expand_inputs(str(tmp_path / "d"))


def test_sample_corpus_is_deterministic_and_pile_shaped(sample_corpus, tmp_path):
    from megapile.data.sample_corpus import build_sample_corpus

    again = str(tmp_path / "again")
    build_sample_corpus(again, max_mb=1.5, seed=1234)
    for split in ("train/00", "train/01", "val/00", "test/00"):
        a = open(os.path.join(sample_corpus, f"{split}.jsonl.zst"), "rb").read()
        assert a == open(os.path.join(again, f"{split}.jsonl.zst"), "rb").read(), split
    docs = list(JsonlSource(os.path.join(sample_corpus, "train")))
    size = sum(len(d.text.encode()) for d in docs)
    assert 1.0e6 < size < 1.6e6
    components = {d.component for d in docs}
    assert {"Github", "Docstrings"} <= components  # always available: the stdlib
    manifest = json.load(open(os.path.join(sample_corpus, "manifest.json")))
    assert manifest["files"]["val/00.jsonl.zst"]["documents"] > 0
