"""Every shipped config loads; bad configs fail with one line naming the key and the file."""
import glob
import os

import pytest

from megapile.config import ConfigError, TrainConfig, grad_accum_steps, load_config
from megapile.parallel.ds_config import load_ds_json, resolve_ds_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
DS_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "ds_configs", "*.json")))


def test_shipped_files_exist():
    names = {os.path.basename(p) for p in CONFIGS + DS_CONFIGS}
    for size in ("14m", "70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b"):
        assert f"pythia-{size}.yaml" in names
    assert {"tiny.yaml", "neox-20b.yaml", "zero0.json", "zero1.json", "zero2.json", "zero3.json",
            "zero3_offload.json"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_loads(path):
    cfg = load_config(path)
    assert cfg.train.global_batch_size % cfg.train.micro_batch_size == 0
    if cfg.model.vocab_size:
        assert cfg.model.padded_vocab_size % 128 == 0


def test_pythia_shapes_are_the_published_ones():
    shapes = {"14m": (6, 128, 4), "70m": (6, 512, 8), "160m": (12, 768, 12), "410m": (24, 1024, 16),
              "1b": (16, 2048, 8), "1.4b": (24, 2048, 16), "2.8b": (32, 2560, 32), "6.9b": (32, 4096, 32),
              "12b": (36, 5120, 40)}
    for size, shape in shapes.items():
        m = load_config(os.path.join(ROOT, "configs", f"pythia-{size}.yaml")).model
        assert (m.num_layers, m.hidden_size, m.num_heads) == shape, size
        assert m.padded_vocab_size == 50304 and m.rotary_pct == 0.25 and m.parallel_residual
    neox = load_config(os.path.join(ROOT, "configs", "neox-20b.yaml")).model
    assert (neox.num_layers, neox.hidden_size, neox.num_heads, neox.padded_vocab_size) == (44, 6144, 64, 50432)


@pytest.mark.parametrize("path", DS_CONFIGS, ids=os.path.basename)
def test_every_ds_config_resolves(path):
    cfg = load_config(None, ["train.micro_batch_size=2", "train.global_batch_size=8"])
    ds = resolve_ds_config(load_ds_json(path), cfg, dp_size=2, dtype="fp32", source=path)
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 8 and ds["bf16"]["enabled"] is False
    assert not any(k.startswith("_") for k in ds)


def _error(tmp_path, text, overrides=()):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(str(path), list(overrides))
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_unknown_key_is_named(tmp_path):
    assert "unknown key 'model.num_layer'" in _error(tmp_path, "model:\n  num_layer: 3\n")
    assert "unknown key 'trian'" in _error(tmp_path, "trian:\n  max_steps: 3\n")


def test_wrong_type_is_named(tmp_path):
    assert "train.max_steps must be int" in _error(tmp_path, "train:\n  max_steps: ten\n")
    assert "optim.lr must be float" in _error(tmp_path, "optim:\n  lr: fast\n")
    assert "logging.wandb must be bool" in _error(tmp_path, "logging:\n  wandb: 3\n")


def test_a_key_that_is_a_python_keyword(tmp_path):
    """checkpoint.async is the field `async_`: read, written back and checked under its YAML key only."""
    path = tmp_path / "c.yaml"
    path.write_text("checkpoint:\n  async: true\n")
    cfg = load_config(str(path))
    assert cfg.checkpoint.async_ is True and cfg.to_dict()["checkpoint"]["async"] is True
    assert "async_" not in cfg.to_dict()["checkpoint"]
    assert load_config(None, ["checkpoint.async=false"]).checkpoint.async_ is False
    assert "unknown key 'checkpoint.async_'" in _error(tmp_path, "checkpoint:\n  async_: true\n")
    assert "checkpoint.async must be bool" in _error(tmp_path, "checkpoint:\n  async: sometimes\n")


def test_bad_values_are_named(tmp_path):
    assert "model.hidden_size (100) must be divisible by model.num_heads (3)" in _error(
        tmp_path, "model:\n  hidden_size: 100\n  num_heads: 3\n")
    assert "model.arch" in _error(tmp_path, "model:\n  arch: bert\n")
    assert "data.train[0]" in _error(tmp_path, "data:\n  train:\n    - {prefix: a, weigth: 1}\n")


def test_llama_shapes_are_the_published_ones():
    m = load_config(os.path.join(ROOT, "configs", "llama-8b.yaml")).model
    assert (m.arch, m.num_layers, m.hidden_size, m.num_heads, m.num_kv_heads, m.intermediate_size) == (
        "llama", 32, 4096, 32, 8, 14336)
    assert (m.padded_vocab_size, m.rotary_base, m.rotary_pct, m.tie_embeddings, m.parallel_residual) == (
        128256, 500000.0, 1.0, False, False)
    small = load_config(os.path.join(ROOT, "configs", "llama-1b.yaml")).model
    assert small.rope_scaling.factor == 32.0 and small.kv_groups == 4


def test_llama_config_survives_a_checkpoint_round_trip():
    """A checkpoint stores the config as plain dicts (dataclasses.asdict); rope_scaling comes back as its dataclass."""
    import dataclasses

    from megapile.config import ModelConfig, RopeScalingConfig

    cfg = load_config(os.path.join(ROOT, "configs", "llama-1b.yaml")).model
    again = ModelConfig(**dataclasses.asdict(cfg))
    assert again == cfg and isinstance(again.rope_scaling, RopeScalingConfig)


def test_checkpoints_of_runs_before_llama_still_resume():
    """A GPT-NeoX checkpoint saved before num_kv_heads and rope_scaling existed has neither key: unset, they must
    compare equal to its model section, or every older run would be refused on resume as 'a different model'."""
    from megapile.checkpoint import compat
    from megapile.checkpoint.state_file import RunState

    model = load_config(os.path.join(ROOT, "configs", "pythia-160m.yaml")).to_dict()["model"]
    older = {k: v for k, v in model.items() if k not in ("num_kv_heads", "rope_scaling")}
    compat.check(RunState(config={"model": older}), model, {}, False, "ckpt")  # no error


def test_another_vocabulary_padding_is_the_same_model():
    """A pythia-1b checkpoint (50304 rows) resumes at tensor 8 (51200): the padding changes, said in one line; another
    vocabulary is still a different model."""
    from megapile.checkpoint import compat
    from megapile.checkpoint.state_file import RunState
    from megapile.parallel.layout import pad_vocab_for_tensor

    path = os.path.join(ROOT, "configs", "pythia-1b.yaml")
    saved = RunState(config={"model": load_config(path).to_dict()["model"]})
    cfg = load_config(path, ["parallel.tensor=8"])
    pad_vocab_for_tensor(cfg)
    compat.check(saved, cfg.to_dict()["model"], {}, False, "ckpt")  # no error
    assert compat.vocab_padding_change(saved, cfg.to_dict()["model"]) == (
        "the vocabulary padding changed from 50304 to 51200 rows (model.pad_vocab_multiple 128 -> 1024): the 50277 "
        "real rows are the checkpoint's, added padding rows are zeros")
    assert compat.vocab_padding_change(saved, saved.config["model"]) is None
    other = load_config(path, ["model.vocab_size=50280"]).to_dict()["model"]
    with pytest.raises(ConfigError, match=r"different model \(model.vocab_size: 50277 -> 50280\)"):
        compat.check(saved, other, {}, False, "ckpt")


def test_llama_keys_are_checked(tmp_path):
    assert "model.num_heads (8) must be divisible by model.num_kv_heads (3)" in _error(
        tmp_path, "model:\n  arch: llama\n  num_heads: 8\n  num_kv_heads: 3\n")
    assert "model.num_kv_heads must be > 0" in _error(tmp_path, "model:\n  arch: llama\n  num_kv_heads: 0\n")
    assert "only model.arch llama, qwen2 supports" in _error(tmp_path, "model:\n  num_kv_heads: 2\n")
    assert "model.rope_scaling is supported with model.arch llama only" in _error(
        tmp_path, "model:\n  rope_scaling: {factor: 8.0}\n")
    assert "model.rope_scaling.high_freq_factor (1.0) must be > model.rope_scaling.low_freq_factor (2.0)" in _error(
        tmp_path, "model:\n  arch: llama\n  rope_scaling: {low_freq_factor: 2.0, high_freq_factor: 1.0}\n")
    assert "unknown key 'model.rope_scaling.factr'" in _error(
        tmp_path, "model:\n  arch: llama\n  rope_scaling: {factr: 8.0}\n")
    assert "model.rotary_pct must be 1.0 with model.arch llama" in _error(
        tmp_path, "model:\n  arch: llama\n  rotary_pct: 0.25\n")


def test_overrides_apply_and_are_checked(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("train:\n  max_steps: 3\n")
    cfg = load_config(str(path), ["train.max_steps=50", "optim.lr=3e-4", "data.train=[{prefix: a, weight: 2}]"])
    assert cfg.train.max_steps == 50 and cfg.optim.lr == 3e-4 and cfg.data.train_specs()[0].weight == 2.0


@pytest.mark.parametrize("override,expected", [
    ("train.max_step=5", "command line 'train.max_step=5': unknown key 'train.max_step'"),
    ("trian.max_steps=5", "command line 'trian.max_steps=5': unknown key 'trian'"),
    ("train.max_steps=ten", "command line 'train.max_steps=ten': train.max_steps must be int"),
    ("model.dropout=1.5", "command line 'model.dropout=1.5': model.dropout must be in [0, 1)"),
    ("data.train=[{prefix: a, weight: x}]", "command line 'data.train=[{prefix: a, weight: x}]': "
                                            "data.train[0].weight must be float"),
    ("train=3", "command line 'train=3': train must be a mapping"),
])
def test_a_bad_override_is_named_as_the_command_line(tmp_path, override, expected):
    """The value came from the command line, so the error says so, not the config file it was applied to."""
    path = tmp_path / "ok.yaml"
    path.write_text("model:\n  num_layers: 2\ntrain:\n  max_steps: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), [override, "optim.lr=1e-3"])
    assert str(info.value).startswith(expected) and "\n" not in str(info.value), str(info.value)
    # the same mistake in the file names the file, even with overrides given for other keys
    key, _, value = override.partition("=")
    section, _, rest = key.partition(".")
    text = f"{section}:\n  {rest}: {value}\n" if rest else f"{section}: {value}\n"
    assert _error(tmp_path, text, ["optim.lr=1e-3"]).startswith(str(tmp_path / "bad.yaml") + ":")


def test_batch_arithmetic_is_checked_once():
    train = TrainConfig(micro_batch_size=4, global_batch_size=16)
    assert grad_accum_steps(train, 2) == 2
    with pytest.raises(ConfigError, match=r"global_batch_size \(16\) must be a multiple of .* \(4\) × data-parallel size \(3\)"):
        grad_accum_steps(train, 3)


def test_deepspeed_json_must_agree_with_yaml(tmp_path):
    cfg = load_config(None, ["train.micro_batch_size=2", "train.global_batch_size=8"])
    for key, value in [("train_batch_size", 16), ("train_micro_batch_size_per_gpu", 4),
                       ("gradient_accumulation_steps", 1), ("gradient_clipping", 0.5)]:
        with pytest.raises(ConfigError, match=key):
            resolve_ds_config({key: value}, cfg, dp_size=2, dtype="fp32", source="x.json")
    with pytest.raises(ConfigError, match="bf16.enabled is True but train.dtype resolves to fp32"):
        resolve_ds_config({"bf16": {"enabled": True}}, cfg, dp_size=1, dtype="fp32", source="x.json")
    with pytest.raises(ConfigError, match="remove 'optimizer'"):
        resolve_ds_config({"optimizer": {"type": "Adam"}}, cfg, dp_size=1, dtype="fp32", source="x.json")
    agreeing = resolve_ds_config({"train_batch_size": 8}, cfg, dp_size=2, dtype="bf16", source="x.json")
    assert agreeing["bf16"]["enabled"] is True


def test_deepspeed_json_that_does_not_parse(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"zero_optimization": {"stage": 2,}}')
    with pytest.raises(ConfigError, match=r"broken.json: not valid JSON: .* line 1 column"):
        load_ds_json(str(path))


def test_bf16_gradients_are_summed_in_fp32_where_deepspeed_can():
    """train.grad_accum_dtype: auto is fp32 at ZeRO >= 1 and the training dtype at ZeRO-0 (DeepSpeed's ZeRO-0 engine
    raises NotImplementedError for bf16 with fp32 accumulation); an explicit fp32 there is one line naming the fix."""
    def resolved(stage, *overrides):
        cfg = load_config(None, ["train.micro_batch_size=2", "train.global_batch_size=8", *overrides])
        return resolve_ds_config({"zero_optimization": {"stage": stage}}, cfg, dp_size=1, dtype="bf16", source="x.json")

    for stage in (1, 2, 3):
        assert resolved(stage)["data_types"] == {"grad_accum_dtype": "fp32"}
        assert resolved(stage, "train.grad_accum_dtype=bf16")["data_types"] == {"grad_accum_dtype": "bf16"}
    assert resolved(0)["data_types"] == {"grad_accum_dtype": "bf16"}
    with pytest.raises(ConfigError, match="train.grad_accum_dtype fp32 with train.dtype bf16 needs "
                                          "zero_optimization.stage >= 1 .* use ds_configs/zero1.json"):
        resolved(0, "train.grad_accum_dtype=fp32")
    with pytest.raises(ConfigError, match="must be auto, fp32 or the training dtype"):
        resolved(1, "train.grad_accum_dtype=fp16")
    cfg = load_config(None, ["train.micro_batch_size=2", "train.global_batch_size=8"])
    with pytest.raises(ConfigError, match="data_types.grad_accum_dtype is 'bf16' but the megapile config gives 'fp32'"):
        resolve_ds_config({"zero_optimization": {"stage": 1}, "data_types": {"grad_accum_dtype": "bf16"}}, cfg,
                          dp_size=1, dtype="bf16", source="x.json")
    assert "data_types" not in resolve_ds_config({}, cfg, dp_size=1, dtype="fp32", source="x.json")


def test_bf16_pipeline_at_zero0_is_refused_in_one_line():
    """DeepSpeed's ZeRO-0 pipeline steps bf16 with an optimizer whose checkpoint it cannot load again (saved as one
    dict, loaded as a per-rank list: KeyError 0 at resume). ZeRO-1 is the supported bf16 pipeline; fp32 stays."""
    cfg = load_config(None, ["train.micro_batch_size=2", "train.global_batch_size=8", "parallel.pipeline=2"])
    with pytest.raises(ConfigError, match=r"x.json: parallel.pipeline > 1 in bf16 needs zero_optimization.stage 1 "
                                          r"\(parallel.zero_stage: 1\)") as e:
        resolve_ds_config({"zero_optimization": {"stage": 0}}, cfg, dp_size=1, dtype="bf16", source="x.json")
    assert "\n" not in str(e.value)
    for stage, dtype in ((1, "bf16"), (0, "fp32")):
        resolve_ds_config({"zero_optimization": {"stage": stage}}, cfg, dp_size=1, dtype=dtype, source="x.json")
