"""Walk docs/errors.md: every row's bad input, run as a user would, prints exactly that one line, no traceback,
and leaves no output files behind."""
import json
import os
import re
import subprocess
import sys

import pytest
from train_helpers import DS, ROOT, TRAIN, small_run_overrides

from megapile.runtime.run_lock import RunLock

TABLE = os.path.join(ROOT, "docs", "errors.md")


def _rows() -> dict[str, str]:
    rows = {}
    for line in open(TABLE):
        m = re.match(r"\| ([a-z]+-[a-z-]+) \| (``? ?)(.+?)( ?``?) \|", line)
        if m:
            rows[m.group(1)] = m.group(3)
    return rows


def _pattern(message: str) -> str:
    return "".join(".+?" if part.startswith("{") else re.escape(part) for part in re.split(r"(\{[^}]*\})", message))


def _megapile(args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "megapile.cli"] + args, cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))


def _train(args, cwd, env=None):
    return subprocess.run([sys.executable, TRAIN] + args, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=dict({k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")},
                                   OMP_NUM_THREADS="1", **(env or {})))


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory, tokenizer_path, preprocessed):
    """A one-step run's checkpoints, for the rows about checkpoints that exist."""
    run_dir = tmp_path_factory.mktemp("ckpt") / "run"
    proc = _train(small_run_overrides(preprocessed, tokenizer_path, str(run_dir), train__max_steps=1,
                                      checkpoint__every=1, train__eval_every=0), ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return str(run_dir / "checkpoints")


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory, sample_corpus, tokenizer_path, preprocessed, checkpoint_dir):
    """id -> (function running the bad input in a fresh directory, files that must not exist afterwards)."""
    work = tmp_path_factory.mktemp("errors")
    val = os.path.join(sample_corpus, "val", "*.jsonl.zst")
    truncated = work / "cut.jsonl.zst"
    first_val = sorted(os.listdir(os.path.join(sample_corpus, "val")))[0]
    truncated.write_bytes(open(os.path.join(sample_corpus, "val", first_val), "rb").read()[:3000])
    bad_tok = work / "bad_tokenizer.json"
    bad_tok.write_text("{not json")
    good = small_run_overrides(preprocessed, tokenizer_path, str(work / "run"))
    unknown = work / "unknown.yaml"
    unknown.write_text("model:\n  num_layer: 2\n")
    ok_yaml = work / "ok.yaml"
    ok_yaml.write_text("model:\n  num_layers: 2\n")
    broken = work / "broken.json"
    broken.write_text('{"zero_optimization": {"stage": 2,,}}')
    disagree = work / "disagree.json"
    disagree.write_text(json.dumps({"train_batch_size": 99}))
    optimizer = work / "optimizer.json"
    optimizer.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    blocker = work / "a_file"
    blocker.write_text("x")
    rewritten = work / "rewritten_tokenizer.json"  # the same vocabulary, other bytes: another fingerprint
    rewritten.write_text(json.dumps(json.load(open(tokenizer_path)), indent=1))

    def busy(d):  # this process holds the run directory a run is then started on
        with RunLock(str(d / "run")):
            return _train(good + [f"logging.run_dir={d}/run"], d)

    def clobber(d):
        (d / "tokenizer.json").write_text("{}")
        return _megapile(["ckpt", "consolidate", checkpoint_dir, "--output", "model.safetensors"], d)

    pre = lambda inp, tok=tokenizer_path, out="out/x": ["preprocess", "--input", inp, "--tokenizer", str(tok),  # noqa
                                                         "--output-prefix", out, "--no-progress"]
    ds = lambda name: ["--deepspeed_config", os.path.join(DS, name)]  # noqa: E731
    return {
        "data-empty-glob": (lambda d: _megapile(pre("nothing/*.jsonl.zst"), d), ["out"]),
        "data-missing-file": (lambda d: _megapile(pre("missing.jsonl.zst"), d), ["out"]),
        "data-truncated-zstd": (lambda d: (os.makedirs(d / "out"), _megapile(pre(str(truncated)), d))[1],
                                ["out/x.bin", "out/x.idx"]),
        "data-bad-tokenizer": (lambda d: _megapile(pre(val, bad_tok), d), ["out"]),
        "data-output-dir": (lambda d: _megapile(pre(val, out="nodir/x"), d), ["nodir"]),
        "data-hf-source": (lambda d: _megapile(["preprocess", "--hf-dataset", "json", "--hf-data-files", "missing.jsonl",
                                                "--hf-cache-dir", str(d / "cache"), "--tokenizer", tokenizer_path,
                                                "--output-prefix", "out/x", "--no-progress"], d), ["out"]),
        "config-missing-file": (lambda d: _train(["--config", "nope.yaml"], d), ["runs"]),
        "config-unknown-key": (lambda d: _train(["--config", str(unknown)], d), ["runs"]),
        "config-override": (lambda d: _train(["--config", str(ok_yaml)] + good + ["train.max_step=5"], d), ["runs"]),
        "config-wrong-type": (lambda d: _train(good + ["train.max_steps=many"], d), []),
        "config-batch": (lambda d: _train(good + ["train.global_batch_size=7"], d), []),
        "config-grad-accum": (lambda d: _train(good + ["train.dtype=bf16", "train.grad_accum_dtype=fp32"], d), []),
        "config-data-path": (lambda d: _train(good + ["data.train=/nonexistent/pile"], d), []),
        "config-tokenizer": (lambda d: _train(good + [f"data.tokenizer={bad_tok}"], d), []),
        "ds-json": (lambda d: _train(["--deepspeed_config", str(broken)] + good, d), []),
        "ds-disagrees": (lambda d: _train(["--deepspeed_config", str(disagree)] + good, d), []),
        "ds-optimizer": (lambda d: _train(["--deepspeed_config", str(optimizer)] + good, d), []),
        "ds-zero-disagrees": (lambda d: _train(ds("zero2.json") + good + ["parallel.zero_stage=3"], d), []),
        "config-offload-stage": (lambda d: _train(good + ["parallel.offload_optimizer=cpu"], d), []),
        "config-offload-layout": (lambda d: _train(good + ["parallel.tensor=2", "parallel.zero_stage=1",
                                                           "parallel.offload_optimizer=cpu"], d), []),
        "config-tensor-kv-heads": (lambda d: _train(good + ["model.arch=llama", "model.num_kv_heads=1",
                                                            "parallel.tensor=2", "parallel.zero_stage=1"], d), []),
        "ckpt-not-intact": (lambda d: _train(ds("zero0.json") + good + [f"checkpoint.resume={d}/gone/global_step4",
                                                                       f"logging.run_dir={d}/run"], d), []),
        "ckpt-unwritable": (lambda d: _train(good + [f"checkpoint.dir={blocker}/ckpt"], d), []),
        "run-dir-in-use": (busy, ["run/config.yaml", "run/metrics.jsonl"]),
        "ckpt-tool": (lambda d: _megapile(["ckpt", "info", "nothing"], d), []),
        "model-missing": (lambda d: _megapile(["eval", "--checkpoint", "nothing", "--data", val], d), []),
        "model-tensor-world": (lambda d: _megapile(["eval", "--checkpoint", checkpoint_dir, "--data", val,
                                                     "--tensor-parallel", "2"], d), []),
        "model-generate-world": (lambda d: _megapile(["generate", "--checkpoint", checkpoint_dir, "--prompt", "a",
                                                       "--tensor-parallel", "2"], d), []),
        "model-tokenizer": (lambda d: _megapile(["generate", "--checkpoint", checkpoint_dir, "--prompt", "a",
                                                  "--tokenizer", str(rewritten)], d), []),
        "ckpt-tokenizer-exists": (clobber, ["model.safetensors", "model.safetensors.tmp"]),
        "launch-rank": (lambda d: _train(good, d, env={"RANK": "3", "WORLD_SIZE": "2", "LOCAL_RANK": "0",
                                                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}), []),
        "launch-master": (lambda d: _train(good, d, env={"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}), []),
    }


def test_table_and_scenarios_cover_each_other(scenarios):
    assert set(_rows()) == set(scenarios)


@pytest.mark.parametrize("row", sorted(_rows()))
def test_error_row(row, scenarios, tmp_path):
    run, must_not_exist = scenarios[row]
    proc = run(tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "[WARNING]" not in line]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert re.fullmatch(_pattern(_rows()[row]), lines[0]), f"{lines[0]!r} does not match the table's {_rows()[row]!r}"
    for path in must_not_exist:
        assert not os.path.exists(tmp_path / path), f"{path} left behind"
