"""Data pipeline: read the Pile, train/load a tokenizer, write Megatron .bin/.idx, serve samples.

Modules, one job each:
    reader         stream documents from jsonl(.zst/.gz) files or a Hugging Face dataset
    sample_corpus  `megapile data sample`: a small Pile-format corpus from text on this machine
    tokenizer      `megapile tokenizer train` and `load_tokenizer(path)`
    indexed        the Megatron MMapIndexedDataset format (.bin + .idx), read and write
    preprocess     `megapile preprocess`: documents -> tokens -> .bin/.idx, multiprocess
    samples        `build_samples(...)`: packed, shuffled, blended training samples

This file is imported by the CLI before anything else, so it stays free of heavy imports.
"""
from __future__ import annotations


class DataError(ValueError):
    """A problem with the user's data or paths; the message is one line naming the file."""
