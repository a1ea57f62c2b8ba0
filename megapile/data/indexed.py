"""The Megatron-LM / GPT-NeoX MMapIndexedDataset format: `prefix.bin` + `prefix.idx`.

`.bin` is every document's tokens back to back (uint16 when the vocabulary has < 65,500
entries, else int32). `.idx`, all little-endian:

    b"MMIDIDX\\x00\\x00"       9-byte magic
    uint64  version = 1
    uint8   dtype code          (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16)
    uint64  sequence count S
    uint64  document count D+1
    int32[S]    sequence lengths (tokens)
    int64[S]    sequence pointers (byte offset of each sequence in .bin)
    int64[D+1]  document index: 0, then the sequence number that ends each document

We write one sequence per document (its tokens plus the end-of-document token), as
Megatron's `preprocess_data.py` does without sentence splitting, so the document index is
0, 1, ..., S. Files are interchangeable with megatron.core.datasets.indexed_dataset.

`IndexedDatasetWriter` streams: tokens go to a temporary .bin, lengths to a temporary side
file, and `finalize()` writes the .idx in fixed-size blocks then renames both into place.
Memory stays constant whatever the number of documents, and an interrupted run leaves only
`*.tmp` files, never a `.bin`/`.idx` pair that looks complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Optional

import numpy as np

from megapile.data import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}
_CODE_OF = {np.dtype(t): c for c, t in DTYPE_CODES.items()}
_HEADER_SIZE = 9 + 8 + 1 + 8 + 8
_BLOCK = 1 << 20  # entries per block when writing the index


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 if every id fits (Megatron's rule: vocab < 65,500), else int32."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


def _tmp_name(path: str) -> str:
    return f"{path}.{os.getpid()}.tmp"


class IndexedDatasetWriter:
    """Append documents, then `finalize()`; use as a context manager to clean up on error.

        with IndexedDatasetWriter("data/pile", np.uint16) as w:
            w.add_documents(flat_tokens, lengths)   # lengths[i] = tokens of document i
        # data/pile.bin and data/pile.idx now exist
    """

    def __init__(self, prefix: str, dtype):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODE_OF:
            raise ValueError(f"unsupported token dtype {self.dtype}")
        directory = os.path.dirname(os.path.abspath(self.prefix))
        if not os.path.isdir(directory):
            raise DataError(f"output directory '{os.path.dirname(self.prefix) or directory}' does not exist (for prefix '{self.prefix}')")
        self.bin_path, self.idx_path = self.prefix + ".bin", self.prefix + ".idx"
        self._bin_tmp, self._len_tmp = _tmp_name(self.bin_path), _tmp_name(self.prefix + ".lengths")
        try:
            self._bin = open(self._bin_tmp, "wb")
            self._lengths = open(self._len_tmp, "wb")
        except OSError as e:
            raise DataError(f"cannot write '{self.bin_path}': {e.strerror}") from None
        self.num_documents = 0
        self.num_tokens = 0
        self.finalized = False

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as one flat token array and the length of each document."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != len(tokens):
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {len(tokens)} tokens were given")
        if len(lengths) and int(lengths.max()) > np.iinfo(np.int32).max:
            raise DataError(f"{self.prefix}: a document has {int(lengths.max())} tokens, more than the format's int32 limit")
        self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self._lengths.write(lengths.astype(np.int32).tobytes())
        self.num_documents += len(lengths)
        self.num_tokens += len(tokens)

    def add_document(self, tokens) -> None:
        tokens = np.asarray(tokens)
        self.add_documents(tokens, np.array([len(tokens)]))

    def finalize(self, sidecar: Optional[dict] = None) -> None:
        """Write the .idx and move the files into place: .bin, then `sidecar` as .json, then .idx."""
        self._bin.close()
        self._lengths.close()
        n = self.num_documents
        idx_tmp = _tmp_name(self.idx_path)
        itemsize = self.dtype.itemsize
        with open(idx_tmp, "wb") as out, open(self._len_tmp, "rb") as lengths_file:
            out.write(MAGIC + struct.pack("<Q", VERSION) + struct.pack("<B", _CODE_OF[self.dtype]))
            out.write(struct.pack("<Q", n) + struct.pack("<Q", n + 1))
            while block := lengths_file.read(_BLOCK * 4):  # int32 sequence lengths
                out.write(block)
            lengths_file.seek(0)
            pointer = 0
            while block := lengths_file.read(_BLOCK * 4):  # int64 byte offsets, running sum
                lengths = np.frombuffer(block, dtype=np.int32).astype(np.int64) * itemsize
                ends = np.cumsum(lengths) + pointer
                out.write((ends - lengths).tobytes())
                pointer = int(ends[-1])
            for start in range(0, n + 1, _BLOCK):  # document index: 0, 1, ..., n
                out.write(np.arange(start, min(start + _BLOCK, n + 1), dtype=np.int64).tobytes())
        os.unlink(self._len_tmp)
        os.replace(self._bin_tmp, self.bin_path)
        if sidecar is not None:
            json_tmp = _tmp_name(self.prefix + ".json")
            with open(json_tmp, "w") as f:
                json.dump(sidecar, f, indent=2)
                f.write("\n")
            os.replace(json_tmp, self.prefix + ".json")
        os.replace(idx_tmp, self.idx_path)
        self.finalized = True

    def abort(self) -> None:
        """Close and delete the temporary files; nothing is left at the final paths."""
        for f in (self._bin, self._lengths):
            f.close()
        for p in (self._bin_tmp, self._len_tmp, _tmp_name(self.idx_path)):
            if os.path.exists(p):
                os.unlink(p)

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not self.finalized:
            self.finalize()
        elif not self.finalized:
            self.abort()


class IndexedDataset:
    """Read-only, memory-mapped view of `prefix.bin`/`prefix.idx`; `ds[i]` is document i's tokens."""

    def __init__(self, prefix: str):
        self.prefix = str(prefix)
        self.bin_path, self.idx_path = self.prefix + ".bin", self.prefix + ".idx"
        for p in (self.idx_path, self.bin_path):
            if not os.path.isfile(p):
                raise DataError(f"dataset file not found: '{p}'")
        with open(self.idx_path, "rb") as f:
            header = f.read(_HEADER_SIZE)
        if len(header) < _HEADER_SIZE or header[:9] != MAGIC:
            raise DataError(f"{self.idx_path}: not a Megatron index (bad header at byte 0)")
        version, code, s, d = struct.unpack("<QBQQ", header[9:])
        if version != VERSION or code not in DTYPE_CODES:
            raise DataError(f"{self.idx_path}: unsupported version {version} or dtype code {code} (byte 9)")
        self.dtype = np.dtype(DTYPE_CODES[code])
        expected = _HEADER_SIZE + s * 4 + s * 8 + d * 8
        actual = os.path.getsize(self.idx_path)
        if actual < expected:
            raise DataError(f"{self.idx_path}: truncated index: {actual} bytes, header promises {expected}")
        idx = np.memmap(self.idx_path, mode="r", dtype=np.uint8)
        off = _HEADER_SIZE
        self.sequence_lengths = idx[off : off + 4 * s].view(np.int32)
        off += 4 * s
        self.sequence_pointers = idx[off : off + 8 * s].view(np.int64)
        off += 8 * s
        self.document_indices = idx[off : off + 8 * d].view(np.int64)
        bin_size = os.path.getsize(self.bin_path)
        self.num_tokens = int(self.sequence_lengths.sum(dtype=np.int64))
        if bin_size != self.num_tokens * self.dtype.itemsize:
            raise DataError(
                f"{self.bin_path}: {bin_size} bytes, but the index describes {self.num_tokens} tokens of {self.dtype}"
            )
        self.tokens = np.memmap(self.bin_path, mode="r", dtype=self.dtype) if bin_size else np.zeros(0, self.dtype)

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getstate__(self) -> dict:  # pickle by path (for spawned workers), never the mapped arrays
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["prefix"])

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens offset..offset+length of sequence i (a view into the memory map)."""
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize + offset
        n = int(self.sequence_lengths[i]) - offset if length is None else length
        return self.tokens[start : start + n]

    def fingerprint(self) -> str:
        """sha256 of the .idx plus the .bin size: identifies the tokens without reading them all."""
        h = hashlib.sha256()
        with open(self.idx_path, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
        h.update(str(os.path.getsize(self.bin_path)).encode())
        return h.hexdigest()


def dataset_exists(prefix: str) -> bool:
    return os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")
