"""The data every multi-process benchmark trains on: a small Pile-format corpus, a tokenizer and .bin/.idx, built
with the megapile CLI in a work folder."""
from __future__ import annotations

import subprocess


def build(work: str) -> tuple[str, str]:
    """(prefix of pile_train/pile_val, tokenizer.json) under `work`."""
    run = lambda *args: subprocess.run(["megapile", *args], check=True, capture_output=True)  # noqa: E731
    run("data", "sample", f"{work}/corpus", "--max-mb", "2")
    run("tokenizer", "train", "--input", f"{work}/corpus/train/*.jsonl.zst", "--vocab-size", "1024",
        "--output", f"{work}/tokenizer.json")
    for split in ("train", "val"):
        run("preprocess", "--input", f"{work}/corpus/{split}/*.jsonl.zst", "--tokenizer", f"{work}/tokenizer.json",
            "--output-prefix", f"{work}/pile_{split}", "--no-progress")
    return f"{work}/pile", f"{work}/tokenizer.json"
