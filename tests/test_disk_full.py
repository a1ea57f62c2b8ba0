"""A save that fails (disk full) leaves the previous checkpoint and `latest` intact, is reported, and training
continues or stops as configured, with synchronous and asynchronous saves (checkpoint.async: the failed background
write is reported at the next step, when the save would have been committed); an unwritable checkpoint directory
fails at start-up."""
import os
import subprocess
import uuid

import pytest
from harness import run_ranks
from train_helpers import DS, TRAIN, read_metrics, small_run_overrides

from megapile.checkpoint import find_resumable, list_complete


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs: room for one checkpoint of the test model (~2.9 MB), not two."""
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
    yield str(mount)
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _train(run_dir, ckpt_dir, preprocessed, tokenizer_path, **extra):
    overrides = small_run_overrides(preprocessed, tokenizer_path, run_dir, train__max_steps=6, checkpoint__every=2,
                                    checkpoint__dir=ckpt_dir, **extra)
    return run_ranks("ranks", 2, [TRAIN, "--deepspeed_config", os.path.join(DS, "zero1.json")] + overrides,
                     run_dir + "-logs", check=False)  # fails on purpose: the tests read how


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_disk_full_keeps_the_previous_checkpoint_and_continues(mode, tmp_path, small_disk, preprocessed,
                                                               tokenizer_path):
    run_dir = str(tmp_path / "run")
    proc = _train(run_dir, small_disk, preprocessed, tokenizer_path, checkpoint__async=mode == "async")
    assert "saving global_step4 failed on rank" in proc.stdout and "No space left on device" in proc.stdout
    assert "training continues" in proc.stdout
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 5, 6]  # it went on after the failed save
    assert proc.returncode != 0  # ... but the final checkpoint could not be written: that is an error
    assert "megapile: error: saving global_step6 failed" in proc.stderr
    assert [s for s, _ in list_complete(small_disk)] == [2]
    assert not [n for n in os.listdir(small_disk) if n.endswith(".tmp")]
    with open(os.path.join(small_disk, "latest")) as f:
        assert f.read() == "global_step2"
    assert find_resumable(small_disk).step == 2  # and it verifies


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_disk_full_stops_cleanly_when_asked(mode, tmp_path, small_disk, preprocessed, tokenizer_path):
    run_dir = str(tmp_path / "run")
    proc = _train(run_dir, small_disk, preprocessed, tokenizer_path, checkpoint__on_save_error="stop",
                  checkpoint__async=mode == "async")
    assert proc.returncode != 0
    assert "megapile: error: saving global_step4 failed" in proc.stderr
    assert [r["step"] for r in read_metrics(run_dir)][-1] == (4 if mode == "sync" else 5)
    assert find_resumable(small_disk).step == 2


def test_unwritable_checkpoint_dir_fails_at_start(tmp_path, preprocessed, tokenizer_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    overrides = small_run_overrides(preprocessed, tokenizer_path, str(tmp_path / "run"),
                                    checkpoint__dir=str(blocker / "ckpt"))
    proc = run_ranks("python", 1, [TRAIN] + overrides, tmp_path / "logs", timeout=120, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"megapile: error: checkpoint.dir: cannot write to {blocker / 'ckpt'}: Not a directory"]
