"""Sample streams: packing against a brute-force reference, blending, determinism, resume, cache."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from megapile.data import DataError
from megapile.data.indexed import IndexedDatasetWriter
from megapile.data.samples import PackedDataset, _key, blend_assignment, build_samples, permute


def make_dataset(prefix: str, lengths, base: int = 0) -> str:
    """Document i is `lengths[i]` copies of the token base + i: every sample shows where it came from."""
    lengths = np.asarray(lengths)
    tokens = np.repeat(base + np.arange(len(lengths)), lengths)
    with IndexedDatasetWriter(prefix, np.int32) as w:
        w.add_documents(tokens, lengths)
    return prefix


@pytest.fixture
def three(tmp_path):
    rng = np.random.default_rng(0)
    return [make_dataset(str(tmp_path / f"d{k}"), rng.integers(1, 200, size=300), base=1000 * k) for k in range(3)]


def packed_in_order(part: PackedDataset, epoch: int) -> np.ndarray:
    """Brute force: lay the epoch's documents end to end, cut seq_len + 1 tokens every seq_len."""
    order, _ = part._epoch(epoch)
    stream = np.concatenate([part.data.tokens[part.doc_start[d] : part.doc_start[d] + part.doc_len[d]] for d in order])
    L = part.seq_len
    return np.stack([stream[s * L : s * L + L + 1] for s in range(part.samples_per_epoch)])


def reference_samples(part: PackedDataset, epoch: int, positions) -> np.ndarray:
    """The packed samples visited in the epoch's shuffled order."""
    shuffled = permute(np.asarray(positions), part.samples_per_epoch, _key("samples", part.fingerprint, part.seed, epoch))
    return packed_in_order(part, epoch)[shuffled]


def test_packing_matches_brute_force_over_epochs(three, tmp_path):
    stream = build_samples([three[0]], None, seq_len=37, seed=5, cache_dir=str(tmp_path / "c"))
    part = stream.parts[0]
    n = stream.num_samples_per_epoch
    assert n == len(stream) == (part.num_tokens - 1) // 37
    got = stream.get_batch(0, 2 * n + 10)  # two full epochs and a bit
    assert got.shape == (2 * n + 10, 38) and got.dtype == np.int64
    assert np.array_equal(got[:n], reference_samples(part, 0, range(n)))
    assert np.array_equal(got[n : 2 * n], reference_samples(part, 1, range(n)))
    assert not np.array_equal(got[:n], got[n : 2 * n])  # a fresh permutation each epoch
    # each epoch visits every packed sample exactly once, in a shuffled order
    packed = packed_in_order(part, 0)
    assert sorted(map(tuple, got[:n].tolist())) == sorted(map(tuple, packed.tolist()))
    assert not np.array_equal(got[:n], packed)
    assert np.array_equal(stream[n + 3], got[n + 3]) and np.array_equal(stream[10**12], stream.get_batch(10**12, 1)[0])
    with pytest.raises(IndexError):
        stream[-1]


def test_samples_cross_document_boundaries_and_consecutive_samples_share_a_token(three):
    stream = build_samples([three[1]], None, seq_len=64, seed=1)
    rows = stream.get_batch(0, stream.num_samples_per_epoch)
    assert sum(len(np.unique(row)) > 1 for row in rows) > len(rows) // 2  # most samples span documents
    packed = packed_in_order(stream.parts[0], 0)
    assert np.array_equal(packed[1:, 0], packed[:-1, -1])  # the label of one is the input of the next


def test_blend_is_webster_and_prefix_stable():
    w = np.array([0.5, 0.3, 0.2])
    n = 3000
    times = [((j + 0.5) / (wk / w.sum()), k, j) for k, wk in enumerate(w) for j in range(n)]
    times.sort()
    ref_k = np.array([k for _, k, _ in times[:n]])
    ref_j = np.array([j for _, _, j in times[:n]])
    ks, js = blend_assignment(w, 0, n)
    assert np.array_equal(ks, ref_k) and np.array_equal(js, ref_j)
    for start, count in [(0, 1), (1, 7), (999, 1001), (2990, 10)]:
        k2, j2 = blend_assignment(w, start, count)
        assert np.array_equal(k2, ref_k[start : start + count]) and np.array_equal(j2, ref_j[start : start + count])
    # far into training: windows still agree with each other and count on without gaps
    a_k, a_j = blend_assignment(w, 10**11, 500)
    b_k, b_j = blend_assignment(w, 10**11 + 250, 500)
    assert np.array_equal(a_k[250:], b_k[:250]) and np.array_equal(a_j[250:], b_j[:250])
    for k in range(3):
        assert np.array_equal(np.diff(a_j[a_k == k]), np.ones((a_k == k).sum() - 1))


def test_blend_proportions_within_one_percent(three):
    weights = [0.6, 0.3, 0.1]
    stream = build_samples(three, weights, seq_len=16, seed=3)
    for start in (0, 123_457):
        share = np.bincount(stream.datasets_of(start, 20_000), minlength=3) / 20_000
        assert np.all(np.abs(share - weights) < 0.01), share
    rows = stream.get_batch(0, 3000)
    origin = rows[:, 0] // 1000  # the dataset each sample's tokens came from
    assert np.all(np.abs(np.bincount(origin, minlength=3) / 3000 - weights) < 0.01)
    assert np.array_equal(origin, stream.datasets_of(0, 3000))
    sizes = build_samples(three, None, seq_len=16, seed=3)
    expected = np.array([p.samples_per_epoch for p in sizes.parts]) / sizes.num_samples_per_epoch
    assert np.allclose(sizes.weights, expected)
    zero = build_samples(three, [1.0, 0.0, 1.0], seq_len=16, seed=3)
    assert set(np.unique(zero.datasets_of(0, 1000))) == {0, 2}
    assert zero.num_samples_per_epoch == zero.parts[0].samples_per_epoch + zero.parts[2].samples_per_epoch


def test_order_is_a_function_of_the_seed(three):
    a = build_samples(three, [1, 1, 1], seq_len=32, seed=1).get_batch(0, 200)
    b = build_samples(three, [1, 1, 1], seq_len=32, seed=1).get_batch(0, 200)
    c = build_samples(three, [1, 1, 1], seq_len=32, seed=2).get_batch(0, 200)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    f = {build_samples(three, [1, 1, 1], seq_len=32, seed=s).fingerprint for s in (1, 2)}
    f.add(build_samples(three, [1, 1, 2], seq_len=32, seed=1).fingerprint)
    f.add(build_samples(three, [1, 1, 1], seq_len=33, seed=1).fingerprint)
    assert len(f) == 4


def _rank_batches(stream, step, global_batch, micro, rank, world):
    """The convention of megapile.data.loader.Batches: micro-batch j of step s is rows [j*m*dp + r*m, +m)."""
    first = step * global_batch
    return [stream.get_batch(first + j * micro * world + rank * micro, micro) for j in range(global_batch // (micro * world))]


def test_resume_at_any_sample_on_one_or_two_ranks_matches_uninterrupted(three, tmp_path):
    G, m, steps, k_step = 8, 2, 12, 5
    cache = str(tmp_path / "cache")
    straight = build_samples(three, [0.5, 0.25, 0.25], seq_len=24, seed=7, cache_dir=cache)
    expected = straight.get_batch(0, steps * G)  # what an uninterrupted run sees, in order
    for world in (1, 2):
        resumed = build_samples(three, [0.5, 0.25, 0.25], seq_len=24, seed=7, cache_dir=cache)  # a new process
        assert resumed.fingerprint == straight.fingerprint
        for step in range(k_step, steps):
            rows = {}
            for rank in range(world):
                for j, mb in enumerate(_rank_batches(resumed, step, G, m, rank, world)):
                    for i, row in enumerate(mb):
                        rows[j * m * world + rank * m + i] = row
            assert sorted(rows) == list(range(G))
            got = np.stack([rows[i] for i in range(G)])
            assert np.array_equal(got, expected[step * G : (step + 1) * G]), (world, step)
    assert np.array_equal(straight.get_batch(0, 40)[17:], straight.get_batch(17, 23))  # prefix-stable


def test_doc_range_splits_by_document(tmp_path):
    prefix = make_dataset(str(tmp_path / "one"), np.full(1000, 50))
    train = build_samples([prefix], None, seq_len=20, seed=0, doc_range=(0.0, 0.9))
    valid = build_samples([prefix], None, seq_len=20, seed=0, doc_range=(0.9, 1.0))
    seen_train = np.unique(train.get_batch(0, train.num_samples_per_epoch))
    seen_valid = np.unique(valid.get_batch(0, valid.num_samples_per_epoch))
    assert seen_train.min() >= 0 and seen_train.max() < 900
    assert seen_valid.min() >= 900 and seen_valid.max() < 1000
    assert train.fingerprint != valid.fingerprint
    with pytest.raises(DataError, match="doc_range"):
        build_samples([prefix], None, seq_len=20, seed=0, doc_range=(0.5, 0.5))


def test_dataset_smaller_than_one_sample_is_a_clear_error(tmp_path):
    prefix = make_dataset(str(tmp_path / "small"), [3, 4])
    with pytest.raises(DataError, match=r"small: 7 tokens, fewer than one sample of seq_len \+ 1 = 9 tokens"):
        build_samples([prefix], None, seq_len=8, seed=0)
    assert build_samples([prefix], None, seq_len=6, seed=0).num_samples_per_epoch == 1
    with pytest.raises(DataError, match="dataset file not found"):
        build_samples([str(tmp_path / "nope")], None, seq_len=8, seed=0)
    with pytest.raises(DataError, match="2 weights given for 1 datasets"):
        build_samples([prefix], [1, 2], seq_len=4, seed=0)


def test_index_cache_is_written_atomically_reused_and_rebuilt_when_damaged(three, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = build_samples(three[:1], None, seq_len=16, seed=0, cache_dir=str(cache)).get_batch(0, 50)
    files = os.listdir(cache)
    assert len(files) == 1 and files[0].endswith(".npy") and files[0].startswith("d0-")
    monkeypatch.setattr(PackedDataset, "_build_epoch", lambda self, e: pytest.fail("cache not used"))
    assert np.array_equal(build_samples(three[:1], None, seq_len=16, seed=0, cache_dir=str(cache)).get_batch(0, 50), first)
    monkeypatch.undo()
    (cache / files[0]).write_bytes(b"garbage")
    assert np.array_equal(build_samples(three[:1], None, seq_len=16, seed=0, cache_dir=str(cache)).get_batch(0, 50), first)
    assert os.listdir(cache) == files
    default = build_samples(three[:1], None, seq_len=16, seed=0)  # next to the data
    default.get_batch(0, 1)
    assert os.path.isdir(os.path.join(os.path.dirname(three[0]), "index-cache"))


def test_datasets_from_different_tokenizers_are_refused(three):
    for prefix, sha in zip(three[:2], ("a" * 64, "b" * 64)):
        json.dump({"tokenizer": {"sha256": sha}}, open(prefix + ".json", "w"))
    with pytest.raises(DataError, match="different tokenizers"):
        build_samples(three[:2], None, seq_len=8, seed=0)


def test_permute_is_a_bijection():
    for n in (1, 2, 3, 5, 64, 1000, 4097):
        p = permute(np.arange(n), n, key=n)
        assert sorted(p.tolist()) == list(range(n))
    assert not np.array_equal(permute(np.arange(1000), 1000, 1), permute(np.arange(1000), 1000, 2))


def test_real_preprocessed_data(preprocessed, tokenizer_path):
    from megapile.data.tokenizer import load_tokenizer

    eod = load_tokenizer(tokenizer_path).eod_id
    stream = build_samples([preprocessed["train"]], None, seq_len=64, seed=1234)
    batch = stream.get_batch(0, 64)
    assert batch.shape == (64, 65) and batch.min() >= 0 and batch.max() < 1024
    every = stream.get_batch(0, stream.num_samples_per_epoch)[:, :-1]  # the last column repeats in the next sample
    docs = stream.parts[0].num_documents
    assert docs - 5 <= int((every == eod).sum()) <= docs  # one EOD per document, bar the dropped tail
    assert stream.tokenizer_sha256 == load_tokenizer(tokenizer_path).fingerprint
    valid = build_samples([preprocessed["valid"]], None, seq_len=64, seed=1234)
    assert valid.num_samples_per_epoch > 10
