"""Shared fixtures: session-scoped data (a tiny corpus, a tokenizer trained on it, and its .bin/.idx), and a
module-scoped simulated cluster.

    sample_corpus  directory from `megapile data sample --max-mb 1.5` (train/, val/, test/)
    tokenizer_path tokenizer.json: byte-level BPE, vocab 1024, trained on sample_corpus/train
    preprocessed   {"train": prefix, "valid": prefix}: sample_corpus train and val splits
    cluster        tests/cluster's Cluster of node1 and node2, for cross-host launcher tests

The data is built once per test session under tmp_path_factory in a few seconds, without torch.
"""
from __future__ import annotations

import os

import pytest

TINY_CORPUS_MB = 1.5
TINY_VOCAB = 1024


@pytest.fixture(scope="session")
def sample_corpus(tmp_path_factory) -> str:
    from megapile.data.sample_corpus import build_sample_corpus

    out = str(tmp_path_factory.mktemp("data") / "corpus")
    build_sample_corpus(out, max_mb=TINY_CORPUS_MB, seed=1234)
    return out


@pytest.fixture(scope="session")
def tokenizer_path(sample_corpus, tmp_path_factory) -> str:
    from megapile.data.reader import JsonlSource
    from megapile.data.tokenizer import train_tokenizer

    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    texts = (doc.text for doc in JsonlSource(os.path.join(sample_corpus, "train", "*.jsonl.zst")))
    train_tokenizer(texts, TINY_VOCAB, path)
    return path


@pytest.fixture(scope="session")
def preprocessed(sample_corpus, tokenizer_path, tmp_path_factory) -> dict:
    from megapile.data.preprocess import preprocess

    out = tmp_path_factory.mktemp("preprocessed")
    prefixes = {"train": str(out / "pile_train"), "valid": str(out / "pile_val")}
    for split, name in (("train", "train"), ("val", "valid")):
        preprocess(os.path.join(sample_corpus, split, "*.jsonl.zst"), tokenizer_path, prefixes[name], workers=1)
    return prefixes


@pytest.fixture(scope="module")
def cluster():
    """Two simulated hosts, node1 and node2 (tests/cluster/): own network, hostname and sshd, shared filesystem.
    Skipped only where namespaces cannot be made (not root); a missing tool fails, since CI installs them."""
    from cluster import Cluster, missing_tools, no_namespaces

    reason = no_namespaces()
    if reason:
        pytest.skip(reason)
    missing = missing_tools()
    if missing:
        pytest.fail(f"the simulated cluster needs {', '.join(missing)}: .ci/run installs them")
    with Cluster(nodes=2) as simulated:
        yield simulated
