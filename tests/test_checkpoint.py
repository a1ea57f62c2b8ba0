"""Checkpoints: bit-exact resume, fallback past damaged checkpoints, SIGTERM (kills during a save: tests/test_faults.py)."""
import json
import os
import shutil
import signal
import time

import pytest
import torch
from harness import ROOT, run_ranks, start_each_rank, start_ranks, wait_for
from train_helpers import DS, TRAIN, assert_close, launch, losses, read_metrics, small_run_overrides

from megapile.checkpoint import find_resumable, list_complete, manifest, prune
from megapile.config import CheckpointConfig
from megapile.runtime.signals import EXIT_CHECKPOINTED


def _overrides(preprocessed, tokenizer_path, run_dir, **extra):
    """Dropout on, so an exact resume needs the RNG streams restored too."""
    extra.setdefault("model__dropout", 0.1)
    extra.setdefault("optim__decay_steps", 8)
    extra.setdefault("train__max_steps", 8)
    return small_run_overrides(preprocessed, tokenizer_path, run_dir, **extra)


# Restarting the same command resumes bit for bit (losses and final weights): tests/test_faults.py's kill campaign
# (ZeRO-1, dropout on: 4 restarts), tests/test_async_checkpoint.py, and across hosts tests/test_cluster.py; a resume
# of a given checkpoint on every layout and precision: tests/test_configuration_matrix.py.


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, preprocessed, tokenizer_path):
    """One process, a checkpoint after every step: global_step1 … global_step4."""
    run_dir = str(tmp_path_factory.mktemp("saved") / "run")
    launch("python", 1, "zero1.json", _overrides(preprocessed, tokenizer_path, run_dir, train__max_steps=4,
                                                  checkpoint__every=1, checkpoint__keep_last=10))
    return run_dir


def _damaged_copy(saved_run, tmp_path, damage):
    ckpt = str(tmp_path / "checkpoints")
    shutil.copytree(os.path.join(saved_run, "checkpoints"), ckpt)
    newest = os.path.join(ckpt, "global_step4")
    shard = os.path.join("portable", sorted(os.listdir(os.path.join(newest, "portable")))[-1])  # a rank's slices
    damage(os.path.join(newest, shard))
    return ckpt, shard


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _flip_byte(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("damage", [os.remove, _truncate, _flip_byte], ids=["deleted", "truncated", "flipped"])
def test_damaged_checkpoint_falls_back_with_a_warning(damage, saved_run, tmp_path):
    ckpt, shard = _damaged_copy(saved_run, tmp_path, damage)
    warnings = []
    found = find_resumable(ckpt, warn=warnings.append)
    assert found.step == 3 and found.tag == "global_step3"
    assert len(warnings) == 1 and "global_step4" in warnings[0] and shard in warnings[0]


def test_size_only_verification_misses_a_flipped_byte_but_not_truncation(saved_run, tmp_path):
    ckpt, _ = _damaged_copy(saved_run, tmp_path / "a", _flip_byte)
    assert find_resumable(ckpt, checksums=False, warn=lambda _: None).step == 4
    ckpt, _ = _damaged_copy(saved_run, tmp_path / "b", _truncate)
    assert find_resumable(ckpt, checksums=False, warn=lambda _: None).step == 3


def test_state_and_manifest_contents(saved_run):
    path = os.path.join(saved_run, "checkpoints", "global_step4")
    assert manifest.verify(path) == []
    with open(os.path.join(path, "megapile_state.json")) as f:
        state = json.load(f)
    assert state["step"] == 4 and state["sample_index"] == 32 and state["tokens_seen"] == 32 * 32
    assert len(state["rng"]) == 1 and {"python", "numpy", "torch"} <= set(state["rng"][0])
    assert state["fingerprints"]["tokenizer"] and state["fingerprints"]["train_data"]
    assert set(state["versions"]) == {"megapile", "deepspeed", "torch"}
    with open(os.path.join(saved_run, "checkpoints", "latest")) as f:
        assert f.read() == "global_step4"


def test_prune_keeps_last_and_every_mth(tmp_path):
    for step in range(1, 11):
        os.makedirs(tmp_path / f"global_step{step}")
    os.makedirs(tmp_path / "global_step3.tmp")  # a killed save, older than the newest good one
    prune(str(tmp_path), CheckpointConfig(keep_last=2, keep_every=4))
    assert [s for s, _ in list_complete(str(tmp_path))] == [10, 9, 8, 4]
    assert not os.path.exists(tmp_path / "global_step3.tmp")


def test_resume_with_a_changed_model_names_the_key(saved_run, tmp_path, preprocessed, tokenizer_path):
    run_dir = str(tmp_path / "run")
    shutil.copytree(saved_run, run_dir)
    proc = run_ranks("python", 1, [TRAIN, "--deepspeed_config", os.path.join(DS, "zero1.json")]
                     + _overrides(preprocessed, tokenizer_path, run_dir, model__hidden_size=128, train__max_steps=6),
                     logs=tmp_path / "logs", timeout=300, check=False)
    assert proc.returncode == 1
    assert "different model (model.hidden_size: 64 -> 128)" in proc.stderr.strip().splitlines()[-1]


def _start(run_dir, preprocessed, tokenizer_path, **extra):
    return start_ranks("python", 1, [TRAIN, "--deepspeed_config", os.path.join(DS, "zero1.json")] + _overrides(
        preprocessed, tokenizer_path, run_dir, **extra), logs=run_dir + "-logs")


@pytest.mark.slow
def test_sigterm_saves_and_exits_with_the_documented_code(tmp_path, preprocessed, tokenizer_path):
    straight = str(tmp_path / "straight")
    launch("python", 1, "zero1.json", _overrides(preprocessed, tokenizer_path, straight, train__max_steps=40,
                                                  optim__decay_steps=40))
    run_dir = str(tmp_path / "run")
    metrics = os.path.join(run_dir, "metrics.jsonl")
    with _start(run_dir, preprocessed, tokenizer_path, train__max_steps=40, optim__decay_steps=40) as proc:
        wait_for(lambda: os.path.exists(metrics) and os.path.getsize(metrics) > 0, proc, 240, "a logged step")
        os.kill(proc.pid, signal.SIGTERM)
        time.sleep(0.01)  # a moment for the first signal to start the save: the second lands in it or after
        os.kill(proc.pid, signal.SIGTERM)  # a second signal during the save must not corrupt it
        done = proc.finish(timeout=120, check=False)
    out = done.stdout
    assert done.returncode == EXIT_CHECKPOINTED, proc.describe()
    stopped_at = read_metrics(run_dir)[-1]["step"]
    assert stopped_at < 40 and f"global_step{stopped_at}" in out
    assert find_resumable(os.path.join(run_dir, "checkpoints")).step == stopped_at
    launch("python", 1, "zero1.json", _overrides(preprocessed, tokenizer_path, run_dir, train__max_steps=40,
                                                  optim__decay_steps=40))
    assert losses(run_dir) == losses(straight)


@pytest.mark.slow
def test_reshard_across_world_sizes_and_zero_stages(tmp_path, preprocessed, tokenizer_path):
    """2 ranks ZeRO-2 -> 1 rank ZeRO-3 -> 2 ranks ZeRO-1 -> 1 rank ZeRO-0 continues like one uninterrupted run."""
    straight = str(tmp_path / "straight")
    launch("python", 1, "zero1.json", _overrides(preprocessed, tokenizer_path, straight, model__dropout=0.0,
                                                  train__max_steps=10, optim__decay_steps=10))
    run_dir = str(tmp_path / "chain")
    chain = [("ranks", 2, "zero2.json", 3), ("python", 1, "zero3.json", 5), ("ranks", 2, "zero1.json", 8),
             ("python", 1, "zero0.json", 10)]
    for launcher, nproc, ds, steps in chain:
        proc = launch(launcher, nproc, ds, _overrides(preprocessed, tokenizer_path, run_dir, model__dropout=0.0,
                                                      train__max_steps=steps, optim__decay_steps=10))
        if steps > 3:
            assert "each rank reads its slices of the fp32 masters and Adam moments" in proc.stdout
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, 11))
    assert_close(losses(run_dir), losses(straight), rel=1e-5)


def test_ckpt_tools(saved_run, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file

    from megapile.cli import main
    from megapile.hf.export import load_model

    ckpt = os.path.join(saved_run, "checkpoints")
    assert main(["ckpt", "info", ckpt]) == 0
    out = capsys.readouterr().out
    assert "step         4 (global sample index 32" in out and "ZeRO-1 on 1" in out
    assert "resumes on   any layout: tensor, pipeline and data-parallel sizes" in out
    assert main(["ckpt", "verify", ckpt]) == 0
    assert "global_step4: ok" in capsys.readouterr().out
    output = str(tmp_path / "model.safetensors")
    assert main(["ckpt", "consolidate", ckpt, "--output", output]) == 0
    weights = load_file(output)
    # one rank holds every parameter whole: its slice file has each fp32 master as one piece
    pieces = load_file(os.path.join(ckpt, "global_step4", "portable", "rank00000-0.safetensors"))
    masters = {key.split("/")[1]: value for key, value in pieces.items() if key.startswith("fp32/")}
    assert set(weights) == set(masters)
    for name, value in masters.items():
        assert torch.equal(weights[name].reshape(-1), value), name
    # eval/generate --dtype bf16: the masters rounded, one parameter in fp32 at a time
    half = load_model(ckpt, "cpu", dtype="bf16").model
    for name, p in half.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, weights[name].bfloat16()), name
    damaged, _ = _damaged_copy(saved_run, tmp_path / "d", _flip_byte)
    assert main(["ckpt", "verify", damaged]) == 1
    assert "global_step4: DAMAGED" in capsys.readouterr().out
    assert main(["ckpt", "info", str(tmp_path / "nothing")]) == 1


@pytest.mark.slow
def test_reshard_a_bf16_zero0_checkpoint_from_its_fp32_masters(tmp_path, preprocessed, tokenizer_path):
    """bf16 ZeRO-0 keeps fp32 masters and moments (DeepSpeed's FP16 optimizers): they, not the bf16 module weights,
    are what its slices hold and what a reshard to 1 rank ZeRO-1 and an export read."""
    from megapile.checkpoint.fragments import Stored
    from megapile.checkpoint.portable import read_full_weights

    common = dict(model__dropout=0.0, train__max_steps=8, optim__decay_steps=8, train__dtype="bf16")
    straight = str(tmp_path / "straight")
    launch("ranks", 2, "zero0.json", _overrides(preprocessed, tokenizer_path, straight, **common))
    run_dir = str(tmp_path / "run")
    launch("ranks", 2, "zero0.json", _overrides(preprocessed, tokenizer_path, run_dir,
                                                   **{**common, "train__max_steps": 4}))
    ckpt = os.path.join(run_dir, "checkpoints", "global_step4")
    with open(os.path.join(ckpt, "megapile_state.json")) as f:
        order = json.load(f)["param_order"]
    stored = Stored(ckpt)
    assert set(stored.params) == set(order) and all(stored.has(n, k) for n in order for k in ("exp_avg", "exp_avg_sq"))
    assert stored.step == 5  # DeepSpeed's unfused FP16_Optimizer creates Adam's state with one zero-grad step
    masters = {n: stored.full(n) for n in order}
    assert any(not torch.equal(t, t.bfloat16().float()) for t in masters.values())  # fp32, not bf16 values
    exported = read_full_weights(ckpt, 0)
    assert all(torch.equal(exported[n], masters[n]) for n in order)
    proc = launch("python", 1, "zero1.json", _overrides(preprocessed, tokenizer_path, run_dir, **common))
    assert "each rank reads its slices of the fp32 masters and Adam moments" in proc.stdout
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, 9))
    assert_close(losses(run_dir), losses(straight), rel=2e-2)  # bf16 on another layout: close, not bit-equal


def test_zero0_low_precision_optimizers_take_and_give_back_a_full_state(tmp_path):
    """Loading into bf16/fp16 ZeRO-0 sets DeepSpeed's fp32 masters and Adam moments, not only the module's bf16
    weights (which the next step would overwrite from stale masters), and what a save then writes reads back
    unchanged: for the unfused FP16 optimizer (CPU) and the fused one with flat masters per group (GPU)."""
    [rank] = start_each_rank(1, [os.path.join(ROOT, "tests", "probes", "fp16_optimizers.py")], logs=tmp_path / "logs")
    proc = rank.finish(timeout=600)  # a non-zero exit fails the test with the output's tail
    lines = [line for line in proc.stdout.splitlines() if "masters" in line]
    assert lines == [f"{name}: masters 16 exact True round trip True"
                     for name in ("FP16_UnfusedOptimizer", "FP16_Optimizer")], proc.stdout[-2000:]


def test_ckpt_info_describes_a_tensor_pipeline_checkpoint_as_resuming_on_any_layout(tmp_path):
    """Issue 28: a TP/PP checkpoint with slices was told it "resumes on the same layout exactly" and pointed at
    `consolidate` (which drops the moments and the data position)."""
    from megapile.checkpoint import Found, RunState, fragments
    from megapile.checkpoint.tools import _resumes_on

    state = RunState(parallel={"tensor": 2, "pipeline": 2}, world_size=4, zero_stage=1)
    older = Found(str(tmp_path), "global_step3", 3, state)
    assert "same tensor x pipeline x data layout exactly" in _resumes_on(older)  # no slices: saved before them
    os.makedirs(tmp_path / fragments.DIR)
    (tmp_path / fragments.DIR / fragments.INDEX).write_text("{}")
    text = _resumes_on(Found(str(tmp_path), "global_step3", 3, state))
    assert text.startswith("any layout") and "consolidate" not in text
