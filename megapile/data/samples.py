"""Training samples: fixed-length, packed across documents, shuffled, blended, indexed by one integer.

    stream = build_samples(["data/pile_Github", "data/pile_Docs"], [0.7, 0.3], seq_len=2048, seed=1234)
    stream[i]                    # (seq_len + 1,) int64: inputs are [:-1], labels [1:]
    stream.get_batch(start, n)   # (n, seq_len + 1) int64, samples start .. start + n - 1

The order is a pure function of (datasets, weights, seed, seq_len), so the position in training
is one integer, the global sample index, and any index >= 0 is valid (epochs repeat forever):

1. Blend. Sample i goes to the dataset whose turn it is by the Webster (Sainte-Lague) divisor
   method: dataset k's j-th sample sits at time (j + 1/2) / w_k, and sample i is the i-th
   earliest of all these times (ties to the lower k). Every prefix of the order is within K
   samples of the exact proportions (K = number of datasets), no assignment ever depends on how
   many samples are asked for, and the assignment of any window [a, a+n) is computed directly
   in O(n log n), without walking from 0.
2. Packing. Within a dataset, epoch e lays the documents end to end in an order shuffled by
   (seed, epoch) and cuts samples of seq_len + 1 tokens every seq_len tokens (consecutive samples
   share one token, as in Megatron's GPTDataset); the last partial sample of an epoch is dropped.
3. Shuffle. The samples of epoch e are visited in another (seed, epoch)-keyed order.

Both shuffles are Feistel-network permutations: pure integer arithmetic, identical on every
machine and numpy version, and the sample shuffle needs no stored table. Each epoch's document
order and cumulative ends (2 x int64 per document) are cached as a .npy next to the data (or in
`cache_dir`), written atomically and keyed by a hash of the inputs; building it is O(documents).

`doc_range=(0.0, 0.969)` uses only that fraction of each dataset's documents (in file order),
for train/valid/test splits of one dataset; a separate validation prefix works just as well.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
import warnings
from typing import Optional, Sequence

import numpy as np

from megapile.data import DataError
from megapile.data.indexed import IndexedDataset

ALGORITHM_VERSION = 1  # part of every fingerprint: bump if the order of samples ever changes
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


# ---- keyed permutations ----------------------------------------------------------------------


def _key(*parts) -> int:
    return int.from_bytes(hashlib.sha256(json.dumps(parts).encode()).digest()[:8], "little")


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def permute(indices: np.ndarray, n: int, key: int, rounds: int = 4) -> np.ndarray:
    """Position `indices` of a pseudo-random permutation of range(n) keyed by `key`.

    A balanced Feistel network on the smallest even number of bits covering n, with cycle
    walking for the values that land outside [0, n). Vectorised; no table is stored.
    """
    x = np.asarray(indices, dtype=np.uint64).copy()
    if n <= 1 or x.size == 0:
        return x.astype(np.int64)
    bits = max(2, int(n - 1).bit_length())
    bits += bits % 2
    half = np.uint64(bits // 2)
    mask = np.uint64((1 << (bits // 2)) - 1)
    round_keys = [np.uint64(_key(key, r)) for r in range(rounds)]

    def once(v: np.ndarray) -> np.ndarray:
        left, right = v >> half, v & mask
        for rk in round_keys:
            left, right = right, left ^ (_mix(right ^ rk) & mask)
        return (left << half) | right

    with np.errstate(over="ignore"):
        x = once(x)
        outside = x >= np.uint64(n)
        while outside.any():
            x[outside] = once(x[outside])
            outside = x >= np.uint64(n)
    return x.astype(np.int64)


# ---- blending --------------------------------------------------------------------------------


def _count_before(tau: float, weights: np.ndarray) -> np.ndarray:
    """Per dataset, how many of its times (j + 0.5) / w are < tau (same float ops as _times)."""
    count = np.maximum(np.ceil(tau * weights - 0.5), 0).astype(np.int64)
    for _ in range(4):  # fix the estimate in whichever direction rounding pushed it
        down = (count > 0) & ((count - 1 + 0.5) / weights >= tau)
        up = (count + 0.5) / weights < tau
        if not (down.any() or up.any()):
            break
        count = count - down + up
    return count


def blend_assignment(weights: Sequence[float], start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset, that dataset's own sample number) for global samples start .. start+count-1.

    Webster's divisor method, computed for the window directly: prefix-stable by construction.
    `weights` must be positive; they are normalised here.
    """
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    k = len(w)
    if k == 1:
        return np.zeros(count, np.int64), np.arange(start, start + count, dtype=np.int64)
    margin = k + 2  # a sample's time is within k/2 of its position
    lo, hi = max(0.0, float(start - margin)), float(start + count + margin)
    base = _count_before(lo, w)
    extra = np.ceil((hi - lo) * w).astype(np.int64) + 2
    ks = np.repeat(np.arange(k), extra)
    js = np.concatenate([np.arange(b, b + e) for b, e in zip(base, extra)])
    times = (js + 0.5) / w[ks]
    order = np.lexsort((ks, times))
    first = start - int(base.sum())
    if first < 0 or first + count > len(order) or (count and times[order[first + count - 1]] > hi):
        raise AssertionError("blend window too small (a bug)")
    sel = order[first : first + count]
    return ks[sel], js[sel]


# ---- one dataset, packed ---------------------------------------------------------------------


class PackedDataset:
    """One tokenized dataset (or a document range of it) cut into samples of seq_len + 1 tokens."""

    def __init__(self, prefix: str, seq_len: int, seed: int, doc_range=None, cache_dir: Optional[str] = None):
        self.prefix = str(prefix)
        self.data = IndexedDataset(self.prefix)
        self.seq_len = seq_len
        self.seed = seed
        itemsize = self.data.dtype.itemsize
        lengths = np.asarray(self.data.sequence_lengths, dtype=np.int64)
        doc_idx = np.asarray(self.data.document_indices, dtype=np.int64)
        if len(doc_idx) == 0 or doc_idx[0] != 0 or doc_idx[-1] != len(lengths) or np.any(np.diff(doc_idx) < 0):
            raise DataError(f"{self.data.idx_path}: document index is not a sorted list from 0 to {len(lengths)}")
        cum = np.concatenate([[0], np.cumsum(lengths)])
        all_len = cum[doc_idx[1:]] - cum[doc_idx[:-1]]  # tokens per document (all its sequences)
        first_seq = np.minimum(doc_idx[:-1], max(len(lengths) - 1, 0))
        pointers = np.asarray(self.data.sequence_pointers, dtype=np.int64)
        all_start = pointers[first_seq] // itemsize if len(lengths) else np.zeros(len(all_len), np.int64)
        n_docs = len(all_len)
        lo, hi = (0.0, 1.0) if doc_range is None else map(float, doc_range)
        if not 0.0 <= lo < hi <= 1.0:
            raise DataError(f"doc_range must satisfy 0 <= lo < hi <= 1, got ({lo}, {hi})")
        self.doc_range = (lo, hi)
        d0, d1 = int(round(lo * n_docs)), int(round(hi * n_docs))
        self.doc_len = all_len[d0:d1]
        self.doc_start = all_start[d0:d1]
        self.num_documents = d1 - d0
        self.num_tokens = int(self.doc_len.sum())
        self.samples_per_epoch = max(0, (self.num_tokens - 1) // seq_len)
        where = f"{self.prefix}" + (f" documents {d0}..{d1}" if doc_range is not None else "")
        if self.samples_per_epoch < 1:
            raise DataError(
                f"{where}: {self.num_tokens} tokens, fewer than one sample of seq_len + 1 = {seq_len + 1} tokens"
            )
        self.fingerprint = hashlib.sha256(
            json.dumps([self.data.fingerprint(), [d0, d1]]).encode()
        ).hexdigest()
        self.cache_dir = cache_dir if cache_dir is not None else os.path.join(os.path.dirname(os.path.abspath(self.prefix)), "index-cache")
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._cache_warned = False

    # -- epoch index: document order and cumulative ends, cached on disk
    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if epoch in self._epochs:
            return self._epochs[epoch]
        key = hashlib.sha256(json.dumps([ALGORITHM_VERSION, self.fingerprint, self.seed, epoch]).encode()).hexdigest()[:32]
        path = os.path.join(self.cache_dir, f"{os.path.basename(self.prefix)}-{key}.npy")
        table = None
        if os.path.isfile(path):
            try:
                table = np.load(path, mmap_mode="r")
                if table.shape != (2, self.num_documents):
                    table = None
            except (OSError, ValueError):
                table = None
        if table is None:
            table = self._build_epoch(epoch)
            self._save(path, table)
        if len(self._epochs) >= 2:
            self._epochs.pop(next(iter(self._epochs)))
        self._epochs[epoch] = (table[0], table[1])
        return self._epochs[epoch]

    def _build_epoch(self, epoch: int) -> np.ndarray:
        order = permute(np.arange(self.num_documents), self.num_documents, _key("docs", self.fingerprint, self.seed, epoch))
        ends = np.cumsum(self.doc_len[order])
        return np.stack([order, ends])

    def _save(self, path: str, table: np.ndarray) -> None:
        tmp = f"{path}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"  # unique across ranks and nodes
        try:
            os.makedirs(self.cache_dir, exist_ok=True)
            with open(tmp, "wb") as f:
                np.save(f, table)
            os.replace(tmp, path)
        except OSError as e:
            if os.path.exists(tmp):
                os.unlink(tmp)
            if not self._cache_warned:
                warnings.warn(f"cannot cache the sample index in '{self.cache_dir}' ({e.strerror}); rebuilding it in memory",
                              stacklevel=2)
                self._cache_warned = True

    def samples(self, local: np.ndarray) -> np.ndarray:
        """Tokens of this dataset's samples number `local` (any int >= 0), shape (n, seq_len + 1)."""
        width = self.seq_len + 1
        out = np.empty((len(local), width), dtype=np.int64)
        epochs, pos = np.divmod(np.asarray(local, dtype=np.int64), self.samples_per_epoch)
        tokens = self.data.tokens
        for epoch in np.unique(epochs):
            rows = np.nonzero(epochs == epoch)[0]
            order, ends = self._epoch(int(epoch))
            shuffled = permute(pos[rows], self.samples_per_epoch, _key("samples", self.fingerprint, self.seed, int(epoch)))
            first = shuffled * self.seq_len  # token position in this epoch's packed stream
            dpos = np.searchsorted(ends, first, side="right")
            offset = first - (ends[dpos] - self.doc_len[order[dpos]])
            for row, p, o in zip(rows, dpos.tolist(), offset.tolist()):
                col = 0
                while col < width:
                    doc = order[p]
                    take = min(int(self.doc_len[doc]) - o, width - col)
                    if take > 0:
                        s = int(self.doc_start[doc]) + o
                        out[row, col : col + take] = tokens[s : s + take]
                        col += take
                    p, o = p + 1, 0
        return out


# ---- the blended stream ----------------------------------------------------------------------


class SampleStream:
    """Samples of one or more datasets in a fixed blended order; see the module docstring."""

    def __init__(self, parts: list[PackedDataset], weights: np.ndarray, seq_len: int, seed: int,
                 tokenizer_sha256: Optional[str] = None):
        self.parts = parts
        self.weights = weights
        self.seq_len = seq_len
        self.seed = seed
        self.tokenizer_sha256 = tokenizer_sha256  # from the datasets' .json sidecars; None if they have none
        self._active = np.nonzero(weights > 0)[0]
        self.num_samples_per_epoch = int(sum(parts[k].samples_per_epoch for k in self._active))
        self.fingerprint = hashlib.sha256(
            json.dumps(
                {
                    "algorithm": ALGORITHM_VERSION,
                    "datasets": [p.fingerprint for p in parts],
                    "weights": [repr(float(w)) for w in weights],
                    "seed": seed,
                    "seq_len": seq_len,
                }
            ).encode()
        ).hexdigest()

    def __len__(self) -> int:
        """Samples in one pass over every dataset; indices beyond it are valid (next epochs)."""
        return self.num_samples_per_epoch

    def __getitem__(self, index: int) -> np.ndarray:
        index = int(index)
        if index < 0:
            raise IndexError(f"sample index must be >= 0, got {index}")
        return self.get_batch(index, 1)[0]

    def datasets_of(self, start: int, count: int) -> np.ndarray:
        """Which dataset (position in `prefixes`) each of samples start..start+count-1 comes from."""
        ks, _ = blend_assignment(self.weights[self._active], start, count)
        return self._active[ks]

    def get_batch(self, start: int, count: int) -> np.ndarray:
        """Samples start .. start+count-1 as a (count, seq_len + 1) int64 array."""
        start, count = int(start), int(count)
        if start < 0 or count < 0:
            raise IndexError(f"get_batch needs start >= 0 and count >= 0, got ({start}, {count})")
        ks, local = blend_assignment(self.weights[self._active], start, count)
        out = np.empty((count, self.seq_len + 1), dtype=np.int64)
        for k in np.unique(ks):
            rows = np.nonzero(ks == k)[0]
            out[rows] = self.parts[self._active[k]].samples(local[rows])
        return out

    def describe(self) -> list[dict]:
        return [
            {"prefix": p.prefix, "weight": float(w), "documents": p.num_documents, "tokens": p.num_tokens,
             "samples_per_epoch": p.samples_per_epoch, "doc_range": list(p.doc_range)}
            for p, w in zip(self.parts, self.weights)
        ]


def _tokenizer_hash(prefix: str) -> Optional[str]:
    try:
        with open(prefix + ".json") as f:
            return json.load(f)["tokenizer"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # made by another tool: nothing to check


def build_samples(
    prefixes: list[str],
    weights: Optional[list[float]],
    seq_len: int,
    seed: int,
    cache_dir: Optional[str] = None,
    doc_range: Optional[tuple[float, float]] = None,
) -> SampleStream:
    """The sample stream of `prefixes` blended by `weights` (None: proportional to their sizes)."""
    if isinstance(prefixes, (str, os.PathLike)):
        prefixes = [str(prefixes)]
    if not prefixes:
        raise DataError("build_samples needs at least one dataset prefix")
    if seq_len < 1:
        raise DataError(f"seq_len must be >= 1, got {seq_len}")
    if weights is not None:
        if len(weights) != len(prefixes):
            raise DataError(f"{len(weights)} weights given for {len(prefixes)} datasets")
        if any(not np.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
            raise DataError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
    hashes = {p: h for p in prefixes if (h := _tokenizer_hash(p))}
    if len(set(hashes.values())) > 1:
        raise DataError("datasets were made with different tokenizers: " + ", ".join(f"{p} ({h[:12]})" for p, h in hashes.items()))
    parts = [PackedDataset(p, seq_len, seed, doc_range, cache_dir) for p in prefixes]
    w = np.array([p.samples_per_epoch for p in parts] if weights is None else weights, dtype=np.float64)
    return SampleStream(parts, w / w.sum(), seq_len, seed, next(iter(hashes.values()), None))
