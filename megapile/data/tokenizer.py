"""Tokenizers: train a byte-level BPE, or load one from local disk, behind one small wrapper.

`load_tokenizer(path)` accepts
- a `tokenizer.json` file (Hugging Face `tokenizers` format), or a directory holding one
  (any local Hugging Face tokenizer directory with a fast tokenizer);
- a GPT-2-style pair: `vocab.json` or `encoder.json` plus `merges.txt` or `vocab.bpe`
  (given as the directory that holds them, or as the vocab file's path).

The end-of-document token is `<|endoftext|>` (GPT-2, GPT-NeoX and our trained BPEs), falling
back to `</s>`/`<eos>`; padding is `<|padding|>` (GPT-NeoX) or falls back to the EOD token.
`fingerprint` is the sha256 of the tokenizer file(s), recorded with every preprocessed dataset.

    megapile tokenizer train --input 'sample/train/*.jsonl.zst' --vocab-size 8192 --output tok/tokenizer.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from typing import Iterable, Optional, Sequence, Union

from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from megapile.data import DataError
from megapile.data.reader import JsonlSource

EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|padding|>"
SPECIAL_TOKENS = [EOD_TOKEN, PAD_TOKEN]  # ids 0 and 1 in a trained tokenizer, as in GPT-NeoX
_EOD_FALLBACKS = [EOD_TOKEN, "</s>", "<eos>", "<|end_of_text|>"]
_PAD_FALLBACKS = [PAD_TOKEN, "<pad>", "[PAD]"]
_VOCAB_NAMES = ("vocab.json", "encoder.json")
_MERGES_NAMES = ("merges.txt", "vocab.bpe")


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the facts the pipeline needs: EOD/pad ids, size, fingerprint."""

    def __init__(self, backend, files: Sequence[str]):
        self.backend = backend
        self.files = [os.path.abspath(f) for f in files]
        self.fingerprint = _sha256_files(self.files)
        vocab = backend.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1  # ids are 0..vocab_size-1, special tokens included
        self.eod_id = _first_id(backend, _EOD_FALLBACKS)
        if self.eod_id is None:
            raise DataError(f"{files[0]}: tokenizer has none of the end-of-document tokens {_EOD_FALLBACKS}")
        pad = _first_id(backend, _PAD_FALLBACKS)
        self.pad_id = self.eod_id if pad is None else pad
        self._fast = hasattr(backend, "encode_batch_fast")

    @property
    def path(self) -> str:
        return self.files[0]

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        encode = self.backend.encode_batch_fast if self._fast else self.backend.encode_batch
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size}, eod_id={self.eod_id})"


def _first_id(backend, names: Sequence[str]) -> Optional[int]:
    for name in names:
        i = backend.token_to_id(name)
        if i is not None:
            return i
    return None


def _sha256_files(files: Sequence[str]) -> str:
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def _find(directory: str, names: Sequence[str]) -> Optional[str]:
    for name in names:
        p = os.path.join(directory, name)
        if os.path.isfile(p):
            return p
    return None


def load_tokenizer(path: Union[str, os.PathLike]) -> Tokenizer:
    """Load a tokenizer.json, a Hugging Face tokenizer directory, or a GPT-2 vocab+merges pair."""
    path = str(path)
    if not os.path.exists(path):
        raise DataError(f"tokenizer not found: '{path}'")
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    if os.path.isdir(path):
        tok_json = _find(path, ("tokenizer.json",))
    else:
        tok_json = path if os.path.basename(path) not in _VOCAB_NAMES else None
    try:
        if tok_json:
            return Tokenizer(Backend.from_file(tok_json), [tok_json])
        vocab = path if os.path.isfile(path) else _find(directory, _VOCAB_NAMES)
        merges = _find(directory, _MERGES_NAMES)
        if not vocab or not merges:
            raise DataError(
                f"'{path}': no tokenizer.json, and no GPT-2 pair of {'/'.join(_VOCAB_NAMES)} + {'/'.join(_MERGES_NAMES)}"
            )
        return Tokenizer(_gpt2_from_files(vocab, merges), [vocab, merges])
    except DataError:
        raise
    except Exception as e:  # tokenizers raises plain Exception for unreadable files
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"cannot load tokenizer '{path}': {reason}") from None


def _gpt2_from_files(vocab: str, merges: str):
    backend = Backend(models.BPE.from_file(vocab, merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    with open(vocab, encoding="utf-8") as f:
        specials = [t for t in json.load(f) if t.startswith("<|") and t.endswith("|>")]
    if specials:  # e.g. GPT-2's <|endoftext|>: must never be split by BPE
        backend.add_special_tokens(specials)
    return backend


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    output: Union[str, os.PathLike],
    min_frequency: int = 2,
    show_progress: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE (GPT-NeoX style: <|endoftext|>=0, <|padding|>=1) and save it atomically."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise DataError(f"--vocab-size must be at least {256 + len(SPECIAL_TOKENS)} (256 bytes + special tokens), got {vocab_size}")
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    backend.train_from_iterator(texts, trainer)
    output = str(output)
    _atomic_save(backend, output)
    return Tokenizer(backend, [output])


def _atomic_save(backend, output: str) -> None:
    directory = os.path.dirname(os.path.abspath(output))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(output) + ".", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        backend.save(tmp)
        os.replace(tmp, output)
    except BaseException:
        os.unlink(tmp)
        raise


def _limited_texts(source, max_bytes: int) -> Iterable[str]:
    seen = 0
    for doc in source:
        yield doc.text
        seen += len(doc.text)
        if seen >= max_bytes:
            return


def add_cli(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    train = sub.add_parser("train", help="train a byte-level BPE on jsonl(.zst) documents")
    train.add_argument("--input", required=True, nargs="+", help="files, globs or directories of jsonl(.zst/.gz)")
    train.add_argument("--vocab-size", type=int, required=True, help="including the 2 special tokens")
    train.add_argument("--output", required=True, help="where to write tokenizer.json (parent created)")
    train.add_argument("--max-mb", type=float, default=1000.0, help="train on at most this many MB of text")
    train.add_argument("--min-frequency", type=int, default=2)
    train.add_argument("--component", action="append", help="only documents of this Pile component (repeatable)")


def cli_main(args: argparse.Namespace) -> int:
    try:
        source = JsonlSource(args.input, components=args.component)
        tok = train_tokenizer(
            _limited_texts(source, int(args.max_mb * 1e6)),
            args.vocab_size,
            args.output,
            min_frequency=args.min_frequency,
            show_progress=sys.stderr.isatty(),
        )
    except DataError as e:
        print(f"megapile: error: {e}", file=sys.stderr)
        return 1
    for line in source.skips.lines():
        print(f"skipped {line}", file=sys.stderr)
    print(f"wrote {tok.path}: vocab_size={tok.vocab_size} eod_id={tok.eod_id} pad_id={tok.pad_id} sha256={tok.fingerprint[:12]}")
    return 0
