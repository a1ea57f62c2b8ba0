"""What the metrics sinks show across a run's life: honest throughput (evaluation and saving timed apart), elapsed
time and ETA, one wandb run and one TensorBoard stream per run directory however often it restarts or rolls
back."""
import glob
import json
import os

import pytest
from harness import ROOT, run_ranks, start_ranks, wait_for
from train_helpers import DS, TRAIN, launch, read_metrics, small_run_overrides


@pytest.mark.slow
def test_tokens_per_second_leaves_out_evaluation_and_saving(tmp_path, preprocessed, tokenizer_path):
    run_dir = str(tmp_path / "run")
    harness = os.path.join(ROOT, "tests", "probes", "fake_clock_train.py")
    proc = run_ranks("python", 1, [harness, "--deepspeed_config", os.path.join(DS, "zero0.json")]
                     + small_run_overrides(preprocessed, tokenizer_path, run_dir, train__max_steps=6,
                                           train__log_every=1, train__eval_every=2, checkpoint__every=3),
                     tmp_path / "logs")  # a non-zero exit fails the test with the output's tail
    records = read_metrics(run_dir)
    assert [r["tokens_per_s"] for r in records] == [8 * 32.0] * 6  # global batch × seq_len per 1 s step
    assert [r.get("eval_seconds") for r in records] == [None, 1000.0, None, 1000.0, None, 1000.0]
    assert [r.get("save_seconds") for r in records] == [None, None, None, 500.0, None, None]
    assert "throughput over 5 steps (first interval excluded as warm-up): 256 tokens/s" in proc.stdout
    # the step lines' elapsed time and ETA are wall time (evaluation and saving included), this start's pace
    assert [r["elapsed_seconds"] for r in records] == [1.0, 1002.0, 1003.0, 2504.0, 2505.0, 3506.0]
    assert [r["eta_seconds"] for r in records] == [5.0, 2004.0, 1003.0, 1252.0, 501.0, 0.0]
    assert "| 16m43s elapsed | ETA 16m43s" in proc.stdout + proc.stderr  # step 3: 1003 s, and 1003 s to go


@pytest.mark.slow
def test_a_kill_a_resume_and_a_rollback_keep_one_wandb_run_and_one_tensorboard_stream(tmp_path, preprocessed,
                                                                                     tokenizer_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = str(tmp_path / "run")

    def overrides(**extra):
        return small_run_overrides(preprocessed, tokenizer_path, run_dir, logging__wandb=True,
                                   logging__tensorboard=True, checkpoint__every=2, checkpoint__keep_last=10, **extra)

    # start 1: SIGKILLed once step 3 is logged (past the step-2 checkpoint), however fast the machine is
    with start_ranks("python", 1, [TRAIN, "--deepspeed_config", os.path.join(DS, "zero0.json")]
                     + overrides(train__max_steps=60), tmp_path / "logs") as proc:  # SIGKILLed on the way out
        wait_for(lambda: any(r["step"] >= 3 for r in _records(run_dir)), proc, 300, "step 3 logged")
    launch("python", 1, "zero0.json", overrides(train__max_steps=6))  # resumes the newest checkpoint
    launch("python", 1, "zero0.json", overrides(  # rolls back
        train__max_steps=8, checkpoint__resume=os.path.join(run_dir, "checkpoints", "global_step2")))

    run_id = open(os.path.join(run_dir, "wandb_run_id")).read().strip()
    starts = sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*")))
    assert len(starts) == 3 and all(path.endswith("-" + run_id) for path in starts), (run_id, starts)

    events = EventAccumulator(os.path.join(run_dir, "tensorboard"))
    events.Reload()
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == list(range(1, 9))  # each step once: what later starts redid was purged
    logged = [r["loss"] for r in read_metrics(run_dir)]
    assert [e.value for e in loss] == pytest.approx(logged, rel=1e-6)  # the values of the branch that stands


def _records(run_dir):
    try:
        return read_metrics(run_dir)
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or a line being written
        return []


@pytest.mark.slow
def test_validation_bits_per_byte_per_component_while_training(tmp_path, sample_corpus, preprocessed,
                                                                tokenizer_path):
    from megapile.cli import main
    from megapile.data.preprocess import preprocess
    from megapile.data.tokenizer import load_tokenizer

    split = str(tmp_path / "val")
    result = preprocess(os.path.join(sample_corpus, "val", "*.jsonl.zst"), load_tokenizer(tokenizer_path), split,
                        split_by_component=True)
    prefixes = dict(result.outputs)  # component -> prefix
    run_dir = str(tmp_path / "run")
    valid = "[" + ", ".join(f"{{prefix: {p}}}" for p in prefixes.values()) + "]"
    launch("python", 1, "zero0.json", small_run_overrides(
        preprocessed, tokenizer_path, run_dir, train__max_steps=6, train__eval_every=2, train__eval_components=True)
        + [f"data.valid={valid}"])
    evals = [r for r in read_metrics(run_dir) if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]
    for component, prefix in prefixes.items():
        facts = json.load(open(prefix + ".json"))
        for r in evals:
            loss, bpb = r[f"val_loss/{component}"], r[f"val_bpb/{component}"]
            assert bpb == pytest.approx(loss * facts["tokens"] / facts["text_bytes"] / 0.6931471805599453, rel=1e-9)
        assert evals[-1][f"val_loss/{component}"] < evals[0][f"val_loss/{component}"]  # it learns
    out = os.path.join(run_dir, "plot.png")
    assert main(["plot", run_dir, "--output", out]) == 0
    assert open(out, "rb").read()[:8] == b"\x89PNG\r\n\x1a\n"
