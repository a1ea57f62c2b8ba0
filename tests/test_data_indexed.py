"""Megatron .bin/.idx: our writer and reader against megatron-core's, in both directions."""
from __future__ import annotations

import os
import struct
import warnings

import numpy as np
import pytest

from megapile.data import DataError
from megapile.data.indexed import IndexedDataset, IndexedDatasetWriter, token_dtype


def _megatron():
    with warnings.catch_warnings():  # "Transformer Engine and Apex are not installed": irrelevant here
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset as MDataset
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    return MDataset, IndexedDatasetBuilder


def _docs(seed: int, n: int, vocab: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(rng.integers(1, 300))) for _ in range(n)]


@pytest.mark.parametrize("vocab", [50_000, 100_000])
def test_ours_is_read_by_megatron_core(tmp_path, vocab):
    MDataset, _ = _megatron()
    docs = _docs(0, 200, vocab)
    prefix = str(tmp_path / "ours")
    with IndexedDatasetWriter(prefix, token_dtype(vocab)) as w:
        w.add_documents(np.concatenate(docs[:150]), [len(d) for d in docs[:150]])
        for d in docs[150:]:
            w.add_document(d)
    m = MDataset(prefix)
    assert m.index.dtype == (np.uint16 if vocab < 65500 else np.int32)
    assert len(m) == len(docs)
    assert list(m.document_indices) == list(range(len(docs) + 1))
    for i, d in enumerate(docs):
        assert np.array_equal(m[i], d)
    assert np.array_equal(m.get(7, offset=3, length=5), docs[7][3:8])


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_megatron_core_output_is_read_by_ours_byte_identical(tmp_path, dtype):
    import torch

    _, Builder = _megatron()
    docs = _docs(1, 100, 60_000)
    theirs = str(tmp_path / "theirs")
    builder = Builder(theirs + ".bin", dtype=dtype)
    for d in docs:
        builder.add_item(torch.from_numpy(d))
        builder.end_document()
    builder.finalize(theirs + ".idx")
    ours = IndexedDataset(theirs)
    assert ours.dtype == np.dtype(dtype) and len(ours) == len(docs)
    for i, d in enumerate(docs):
        assert np.array_equal(ours[i], d)
    mine = str(tmp_path / "mine")
    with IndexedDatasetWriter(mine, dtype) as w:
        for d in docs:
            w.add_document(d)
    for ext in (".bin", ".idx"):
        assert open(theirs + ext, "rb").read() == open(mine + ext, "rb").read()


def test_header_layout(tmp_path):
    prefix = str(tmp_path / "h")
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        w.add_documents(np.array([5, 6, 7, 0, 9, 0]), [4, 2])
    raw = open(prefix + ".idx", "rb").read()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    assert struct.unpack("<QBQQ", raw[9:34]) == (1, 8, 2, 3)
    assert np.frombuffer(raw[34:42], np.int32).tolist() == [4, 2]
    assert np.frombuffer(raw[42:58], np.int64).tolist() == [0, 8]
    assert np.frombuffer(raw[58:82], np.int64).tolist() == [0, 1, 2]
    assert len(raw) == 82


def test_an_interrupted_write_leaves_nothing_that_looks_finished(tmp_path):
    prefix = str(tmp_path / "x")
    with pytest.raises(KeyboardInterrupt):
        with IndexedDatasetWriter(prefix, np.uint16) as w:
            w.add_document(np.arange(10))
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []
    w = IndexedDatasetWriter(prefix, np.uint16)  # killed before finalize: only *.tmp files exist
    w.add_document(np.arange(10))
    assert not os.path.exists(prefix + ".bin") and not os.path.exists(prefix + ".idx")
    assert all(name.endswith(".tmp") for name in os.listdir(tmp_path))
    w.abort()


def test_missing_directory_and_damaged_files(tmp_path):
    with pytest.raises(DataError, match="output directory .* does not exist"):
        IndexedDatasetWriter(str(tmp_path / "no" / "such" / "prefix"), np.uint16)
    prefix = str(tmp_path / "d")
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        w.add_documents(np.arange(100), [60, 40])
    with pytest.raises(DataError, match="dataset file not found"):
        IndexedDataset(str(tmp_path / "other"))
    raw = open(prefix + ".idx", "rb").read()
    open(prefix + ".idx", "wb").write(raw[:-5])
    with pytest.raises(DataError, match="truncated index"):
        IndexedDataset(prefix)
    open(prefix + ".idx", "wb").write(b"NOTANIDX" + raw[8:])
    with pytest.raises(DataError, match="bad header at byte 0"):
        IndexedDataset(prefix)
    open(prefix + ".idx", "wb").write(raw)
    open(prefix + ".bin", "ab").write(b"\x00\x00")
    with pytest.raises(DataError, match="index describes 100 tokens"):
        IndexedDataset(prefix)
