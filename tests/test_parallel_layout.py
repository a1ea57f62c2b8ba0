"""The tensor × pipeline × data layout: rank arithmetic, and a one-line error for every layout that cannot run."""
import os
import subprocess
import sys

import pytest
from train_helpers import ROOT, TRAIN, small_run_overrides

from megapile.checkpoint.state_file import RunState
from megapile.config import ConfigError, load_config
from megapile.parallel.layout import Layout, check_same_layout, pad_vocab_for_tensor, resolve_layout
from megapile.parallel.pipeline import explicit_parts, gpt_name


def _cfg(*overrides):
    return load_config(None, ["model.vocab_size=1000", *overrides])


def test_ranks_follow_deepspeeds_pipe_data_model_order():
    layout = Layout(world=8, tensor=2, pipeline=2, data=2)
    # rank = stage * (data * tensor) + data_rank * tensor + tensor_rank
    assert [layout.tensor_rank(r) for r in range(8)] == [0, 1] * 4
    assert [layout.data_rank(r) for r in range(8)] == [0, 0, 1, 1] * 2
    assert [layout.stage(r) for r in range(8)] == [0] * 4 + [1] * 4
    tp = resolve_layout(_cfg("parallel.tensor=2", "parallel.zero_stage=1"), 8)
    assert (tp.tensor, tp.pipeline, tp.data) == (2, 1, 4) and tp.describe() == "TP 2 × PP 1 × DP 4"
    assert [tp.data_rank(r) for r in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]  # a TP group reads one batch


@pytest.mark.parametrize("overrides,world,stage,message", [
    (["parallel.tensor=3"], 8, 1,
     r"parallel.tensor \(3\) × parallel.pipeline \(1\) = 3 does not divide the world size \(8\)"),
    (["parallel.tensor=2", "parallel.pipeline=2"], 8, 2,
     r"parallel.tensor > 1 with parallel.pipeline > 1 needs parallel.zero_stage \(zero_optimization.stage in a "
     r"DeepSpeed JSON\) 1, got 2"),
    (["parallel.tensor=8", "model.num_heads=4", "model.hidden_size=64"], 8, 1,
     r"model.num_heads \(4\) must be divisible by parallel.tensor \(8\)"),
    (["parallel.tensor=2"], 2, 0, r"parallel.tensor > 1 needs parallel.zero_stage .* 1 or 2, got 0"),
    (["parallel.tensor=2"], 2, 3, r"parallel.tensor > 1 needs parallel.zero_stage .* 1 or 2, got 3"),
    (["parallel.pipeline=2"], 2, 2, "does not support ZeRO-2/3"),
    (["parallel.pipeline=2"], 2, 3, "does not support ZeRO-2/3"),
    (["parallel.pipeline=4", "model.num_layers=2"], 4, 1,
     r"parallel.pipeline \(4\) is more stages than model.num_layers \(2\)"),
    (["parallel.pipeline=2", "parallel.pipeline_layers=[1,2]"], 2, 1,
     r"must give 2 non-negative block counts summing to"),
    (["parallel.pipeline_layers=[1,1]"], 2, 1, "parallel.pipeline_layers is set but parallel.pipeline is 1"),
    (["parallel.tensor=2", "parallel.offload_optimizer=cpu"], 2, 1,
     r"parallel.offload_optimizer is supported with ZeRO data parallelism only .* got tensor 2 × pipeline 1"),
    (["parallel.pipeline=2", "parallel.offload_optimizer=cpu"], 2, 1,
     r"parallel.offload_optimizer is supported with ZeRO data parallelism only .* got tensor 1 × pipeline 2"),
])
def test_invalid_layouts_are_one_line_errors(overrides, world, stage, message):
    with pytest.raises(ConfigError, match=message) as e:
        resolve_layout(_cfg(*overrides, f"parallel.zero_stage={stage}"), world)
    assert "\n" not in str(e.value)


def test_config_values_are_checked():
    with pytest.raises(ConfigError, match="parallel.tensor must be > 0"):
        _cfg("parallel.tensor=0")
    with pytest.raises(ConfigError, match="parallel.pipeline_partition must be one of"):
        _cfg("parallel.pipeline_partition=random")
    with pytest.raises(ConfigError, match="unknown key 'parallel.data'"):
        _cfg("parallel.data=2")


@pytest.mark.parametrize("preset,rows", [
    ("pythia-1b", {1: 50304, 2: 50432, 4: 50688, 8: 51200}),  # tensor 2: 50432, as the released Pythia 6.9B/12B
    ("neox-20b", {1: 50432, 2: 50432, 4: 50688, 8: 51200}),   # pad_vocab_multiple 256 already
    ("llama-8b", {1: 128256, 2: 128256, 4: 128512, 8: 129024}),
])
def test_the_vocabulary_is_padded_for_each_tensor_parallel_size(preset, rows):
    """The same preset runs at any parallel.tensor: its vocabulary is padded to a multiple of 128 × tensor (and of
    its own model.pad_vocab_multiple), so every tensor-parallel share is a multiple of 128 rows."""
    for tensor, padded in rows.items():
        cfg = load_config(os.path.join(ROOT, "configs", f"{preset}.yaml"), [f"parallel.tensor={tensor}"])
        pad_vocab_for_tensor(cfg)
        assert cfg.model.padded_vocab_size == padded, (tensor, cfg.model.padded_vocab_size)
        assert padded % (128 * tensor) == 0


def test_resume_refuses_another_tensor_or_pipeline_layout():
    saved = RunState(parallel={"tensor": 2, "pipeline": 1, "data": 1}, world_size=2, zero_stage=1)
    check_same_layout(saved, Layout(2, 2, 1, 1), 1, "ck")  # same layout
    check_same_layout(RunState(world_size=2, zero_stage=1), Layout(4, 1, 1, 4), 3, "ck")  # plain DP: resharded
    for layout, stage in ((Layout(2, 1, 2, 1), 1), (Layout(4, 2, 1, 2), 1), (Layout(2, 2, 1, 1), 2),
                          (Layout(2, 1, 1, 2), 1)):
        with pytest.raises(ConfigError, match="resumes only on its own layout"):
            check_same_layout(saved, layout, stage, "ck")


def test_pipeline_names_map_back_to_the_plain_model():
    assert gpt_name("0.embed.weight", 4) == "embed.weight"
    assert gpt_name("1.pos_embed.weight", 4) == "pos_embed.weight"
    assert gpt_name("5.block.attn.qkv.weight", 4) == "blocks.3.attn.qkv.weight"
    assert gpt_name("6.final_norm.bias", 4) == "final_norm.bias"
    assert gpt_name("tied_modules.embed.embed.weight", 4) == "embed.weight"
    # 4 blocks split [1, 3]: embeddings go with stage 0, final norm and head with the last stage
    assert explicit_parts([1, 3]) == [0, 3, 8]
    assert explicit_parts([2, 0]) == [0, 4, 6]


def test_cli_reports_a_bad_layout_in_one_line(tmp_path, preprocessed, tokenizer_path):
    args = small_run_overrides(preprocessed, tokenizer_path, str(tmp_path / "run"), parallel__tensor=2)
    proc = subprocess.run([sys.executable, TRAIN, "--deepspeed_config", os.path.join(ROOT, "ds_configs", "zero1.json")]
                          + args, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not divide the world size (1)" in lines[0], proc.stderr
