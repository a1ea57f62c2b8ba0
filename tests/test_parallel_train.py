"""Tensor and pipeline parallel training on CPU (gloo) against the one-process run, step by step.

Every layout starts from the same weights (per-name seeded init) and reads the same global batches, so
in fp32 the per-step losses must agree to 1e-5 relative; the last stage's loss reaches rank 0's log.
"""
import pytest

from train_helpers import assert_close, launch, losses, read_metrics, small_run_overrides


@pytest.fixture(scope="module")
def reference(tmp_path_factory, preprocessed, tokenizer_path):
    """10 steps in one plain process: global batch 8 = micro 2 × accumulation 4."""
    run_dir = str(tmp_path_factory.mktemp("ref") / "run")
    launch("python", 1, "zero0.json", small_run_overrides(preprocessed, tokenizer_path, run_dir))
    return run_dir


def _run(tmp_path, preprocessed, tokenizer_path, nproc, ds_config, **overrides):
    run_dir = str(tmp_path / "run")
    proc = launch("torchrun", nproc, ds_config, small_run_overrides(preprocessed, tokenizer_path, run_dir, **overrides))
    return run_dir, proc


@pytest.mark.slow
@pytest.mark.parametrize("nproc,tensor,pipeline,ds_config", [
    (2, 2, 1, "zero1.json"),
    (2, 1, 2, "zero1.json"),
    (4, 2, 1, "zero1.json"),
    (4, 1, 2, "zero1.json"),
], ids=["tp2", "pp2", "tp2xdp2", "pp2xdp2"])
def test_parallel_layout_matches_one_process(nproc, tensor, pipeline, ds_config, tmp_path, reference, preprocessed,
                                             tokenizer_path):
    run_dir, proc = _run(tmp_path, preprocessed, tokenizer_path, nproc, ds_config,
                         parallel__tensor=tensor, parallel__pipeline=pipeline)
    assert f"TP {tensor} × PP {pipeline} × DP {nproc // (tensor * pipeline)}" in proc.stdout
    assert_close(losses(run_dir), losses(reference), rel=1e-5)
    assert read_metrics(run_dir)[-1]["val_loss"] == pytest.approx(read_metrics(reference)[-1]["val_loss"], rel=1e-5)
