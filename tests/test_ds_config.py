"""The DeepSpeed config is generated from the YAML's `parallel` keys; a --deepspeed_config JSON fills what the YAML
leaves unset, and any key both set differently is one line naming both (megapile/parallel/ds_config.py)."""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from megapile.config import ConfigError, load_config
from megapile.parallel.ds_config import ZERO_KEYS, _lookup, load_ds_json, resolve_parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DS_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "ds_configs", "*.json")))
CPU = torch.device("cpu")
BATCH = ["train.micro_batch_size=2", "train.global_batch_size=8", "model.vocab_size=1000"]


def _resolve(overrides=(), ds_json=None, world=2):
    cfg = load_config(None, BATCH + list(overrides))
    layout, ds, dtype = resolve_parallel(cfg, ds_json, world, CPU)
    return cfg, layout, ds


def test_neither_yaml_nor_json_is_zero0_without_offload():
    cfg, layout, ds = _resolve()
    assert ds["zero_optimization"] == {"stage": 0}
    assert (cfg.parallel.zero_stage, cfg.parallel.offload_optimizer, cfg.parallel.offload_params) == (0, "none", "none")
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (8, 2, 2)
    assert ds["bf16"] == {"enabled": False} and ds["fp16"] == {"enabled": False} and "tensor_parallel" not in ds


def test_the_yaml_alone_generates_the_zero_section():
    cfg, _, ds = _resolve(["parallel.zero_stage=3", "parallel.offload_optimizer=cpu", "parallel.offload_params=cpu",
                           "parallel.overlap_comm=true", "parallel.reduce_bucket_size=1000",
                           "parallel.allgather_bucket_size=2000", "train.dtype=bf16"])
    assert ds["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                       "offload_param": {"device": "cpu"}, "overlap_comm": True,
                                       "reduce_bucket_size": 1000, "allgather_bucket_size": 2000}
    assert ds["bf16"] == {"enabled": True} and ds["data_types"] == {"grad_accum_dtype": "fp32"}


@pytest.mark.parametrize("path", DS_CONFIGS, ids=os.path.basename)
def test_a_shipped_json_and_the_same_keys_in_yaml_give_the_same_zero_settings(path):
    """The JSON's ZeRO keys land in the resolved run config; the YAML with those values generates them again."""
    from_json, _, ds_json = _resolve(ds_json=path)
    given = load_ds_json(path)["zero_optimization"]
    yaml_keys = []
    for key, (where, default) in ZERO_KEYS.items():
        value = getattr(from_json.parallel, key)
        if key == "overlap_comm" and from_json.parallel.zero_stage >= 1:
            default = False  # on CPU; True on GPUs (test_overlap_comm_is_on_for_gpus_and_off_for_cpus_unless_set)
        assert value == (_lookup(given, where) if _lookup(given, where) is not None else default), key
        if value is not None:
            yaml_keys.append(f"parallel.{key}={str(value).lower() if isinstance(value, bool) else value}")
    _, _, ds_yaml = _resolve(yaml_keys)
    for key, (where, _) in ZERO_KEYS.items():
        assert _lookup(ds_yaml["zero_optimization"], where) == _lookup(ds_json["zero_optimization"], where), key
    # what megapile does not model passes through from the JSON unchanged
    for key, value in given.items():
        if key == "overlap_comm":
            continue
        assert ds_json["zero_optimization"][key] == value
    assert ds_json["wall_clock_breakdown"] is False


@pytest.mark.parametrize("json_zero,key,mine,message", [
    ({"stage": 2}, "zero_stage", "1", r"zero_optimization.stage is 2 but the megapile config gives 1"),
    ({"stage": 2, "offload_optimizer": {"device": "cpu"}}, "offload_optimizer", "nvme",
     r"zero_optimization.offload_optimizer.device is 'cpu' but the megapile config gives 'nvme'"),
    ({"stage": 2, "overlap_comm": False}, "overlap_comm", "true",
     r"zero_optimization.overlap_comm is False but the megapile config gives True"),
    ({"stage": 1, "reduce_bucket_size": 5}, "reduce_bucket_size", "6",
     r"zero_optimization.reduce_bucket_size is 5 but the megapile config gives 6"),
])
def test_a_json_key_that_disagrees_with_the_yaml_is_one_line_naming_both(tmp_path, json_zero, key, mine, message):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"zero_optimization": json_zero}))
    with pytest.raises(ConfigError, match=f"{path}: {message} \\(parallel.{key}\\): set it in one place") as e:
        _resolve([f"parallel.{key}={mine}"], str(path))
    assert "\n" not in str(e.value)
    same = _lookup(json_zero, ZERO_KEYS[key][0])
    cfg, _, _ = _resolve([f"parallel.{key}={str(same).lower()}"], str(path))  # the same value in both: fine
    assert getattr(cfg.parallel, key) == same


@pytest.mark.parametrize("overrides,message", [
    (["parallel.offload_optimizer=cpu"], "parallel.offload_optimizer cpu needs parallel.zero_stage 1, 2 or 3"),
    (["parallel.zero_stage=2", "parallel.offload_params=cpu"], "parallel.offload_params cpu needs parallel.zero_stage 3"),
    (["parallel.zero_stage=4"], "parallel.zero_stage must be 0, 1, 2 or 3, got 4"),
    (["parallel.offload_optimizer=disk"], "parallel.offload_optimizer must be one of none, cpu, nvme; got 'disk'"),
    (["parallel.reduce_bucket_size=0"], "parallel.reduce_bucket_size must be > 0, got 0"),
])
def test_bad_zero_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        _resolve(overrides)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_overlap_comm_is_on_for_gpus_and_off_for_cpus_unless_set(stage):
    """GPU users expect the gradient reduction to overlap the backward pass; on CPU (gloo) off is deterministic.
    A value given in the YAML or a JSON wins; ZeRO-0 has nothing to overlap and leaves it unset."""
    for device, expected in ((CPU, False), (torch.device("cuda"), True)):
        cfg = load_config(None, BATCH + [f"parallel.zero_stage={stage}"])
        _, ds, _ = resolve_parallel(cfg, None, 2, device)
        assert ds["zero_optimization"]["overlap_comm"] is expected and cfg.parallel.overlap_comm is expected
    cfg = load_config(None, BATCH + [f"parallel.zero_stage={stage}", "parallel.overlap_comm=false"])
    assert resolve_parallel(cfg, None, 2, torch.device("cuda"))[1]["zero_optimization"]["overlap_comm"] is False
    assert "overlap_comm" not in resolve_parallel(load_config(None, BATCH), None, 2, torch.device("cuda"))[1][
        "zero_optimization"]


def test_tensor_parallel_gets_deepspeeds_autotp_section_unless_pipelined():
    _, layout, ds = _resolve(["parallel.tensor=2", "parallel.zero_stage=1"], world=4)
    assert (layout.tensor, layout.data) == (2, 2) and ds["tensor_parallel"]["autotp_size"] == 2
    assert ds["gradient_accumulation_steps"] == 2  # micro 2 × accum 2 × dp 2 = 8
    _, _, ds = _resolve(["parallel.tensor=2", "parallel.pipeline=2", "parallel.zero_stage=1",
                         "model.num_layers=2"], world=4)
    assert "tensor_parallel" not in ds  # each pipeline stage splits its own blocks


def _show(*args):
    return subprocess.run([sys.executable, "-m", "megapile.cli", "config", "show", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_config_show_prints_the_resolved_config_and_the_generated_json():
    proc = _show("configs/tiny.yaml", "ds_configs/zero3_offload.json", "--world_size", "2",
                 "train.micro_batch_size=2", "train.global_batch_size=8")
    assert proc.returncode == 0, proc.stderr
    run_text, ds_text = proc.stdout.split("# DeepSpeed config, generated (what deepspeed.initialize receives)\n")
    run = yaml.safe_load(run_text)
    assert run["parallel"]["zero_stage"] == 3 and run["parallel"]["offload_optimizer"] == "cpu"
    assert run["train"]["micro_batch_size"] == 2
    ds = json.loads(ds_text)
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["gradient_accumulation_steps"] == 2 and "TP 1 × PP 1 × DP 2 on 2 rank(s)" in run_text.splitlines()[0]

    proc = _show("configs/tiny.yaml", "ds_configs/zero2.json", "parallel.zero_stage=3")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip() == ("megapile: error: ds_configs/zero2.json: zero_optimization.stage is 2 but the "
                                   "megapile config gives 3 (parallel.zero_stage): set it in one place")


def test_dtype_auto_is_bf16_only_where_the_gpu_computes_in_it(monkeypatch):
    """fp32 on CPU; on a GPU bf16 from compute capability 8.0 (faked here), fp16 with loss scaling before it."""
    from megapile.parallel.ds_config import resolve_dtype

    cfg = load_config(None, BATCH)
    assert resolve_dtype(cfg, CPU) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for supported, dtype in ((True, "bf16"), (False, "fp16")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, s=supported: s)
        assert resolve_dtype(cfg, torch.device("cuda", 0)) == dtype
    _, _, ds = _resolve(["train.dtype=auto"], world=2)  # through resolve_parallel on CPU
    assert ds["bf16"] == {"enabled": False} and ds["fp16"] == {"enabled": False}
