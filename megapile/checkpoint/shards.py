"""Full weights from a tensor- or pipeline-parallel checkpoint (what `megapile ckpt consolidate` writes).

DeepSpeed writes one set of files per model-parallel rank m (a tensor rank, or a pipeline stage):
`mp_rank_{m}_model_states.pt` (parameter names and shapes; under AutoTP also the module's slices) and, with
ZeRO ≥ 1, `zero_pp_rank_{d}_mp_rank_{m}_optim_states.pt` per data-parallel rank d holding the flat fp32 master
partitions. A pipeline stage's module weights are in `layer_{i}-model_states.pt`, one file per layer.

For each model-parallel rank the fp32 master weights are reassembled with DeepSpeed's own `zero_to_fp32`
merge (the module weights with ZeRO-0), renamed to `model.GPT` names, and then joined: tensor-parallel
slices are concatenated along their split dimension, pipeline stages are merged by name.
"""
from __future__ import annotations

import glob
import os
import re

import torch
from deepspeed.utils import zero_to_fp32 as z

from megapile.checkpoint.state_file import RunState
from megapile.models import family
from megapile.parallel.pipeline import gpt_name
from megapile.parallel.tensor import gather_full


def read_parallel_weights(path: str, state: RunState) -> dict[str, torch.Tensor]:
    """{GPT parameter name: fp32 tensor} from checkpoint `path` written with `state.parallel`.

    Model-parallel rank m is pipeline stage m // tensor, tensor rank m % tensor (DeepSpeed numbers the ranks of
    one data-parallel replica in global-rank order: stage-major, tensor-minor).
    """
    tensor, pipeline, zero_stage = state.tensor, state.pipeline, state.zero_stage
    num_layers = state.config["model"]["num_layers"]
    plan = family(state.config["model"].get("arch", "neox")).tensor_plan  # configs before model.arch: neox
    if pipeline > 1 and zero_stage == 0:
        per_rank = [_pipeline_layer_weights(path, t, tensor) for t in range(tensor)]  # one "stage": all layers
        stages = [gather_full(per_rank, plan)]
    else:
        per_rank = [_model_parallel_rank_weights(path, m, zero_stage) for m in range(tensor * pipeline)]
        stages = [gather_full(per_rank[s * tensor:(s + 1) * tensor], plan) for s in range(pipeline)]
    if pipeline == 1:
        return stages[0]
    full: dict[str, torch.Tensor] = {}
    for weights in stages:
        for name, t in weights.items():
            full.setdefault(gpt_name(name, num_layers), t)  # a tied embedding appears on two stages
    return full


def _model_parallel_rank_weights(path: str, mp_rank: int, zero_stage: int) -> dict[str, torch.Tensor]:
    model_state = torch.load(os.path.join(path, f"mp_rank_{mp_rank:02d}_model_states.pt"), map_location="cpu",
                             weights_only=False)
    if zero_stage == 0:
        return {n: t.float() for n, t in model_state["module"].items()}
    optim_files = sorted(glob.glob(os.path.join(path, f"*zero_pp_rank_*_mp_rank_{mp_rank:02d}_optim_states.pt")),
                         key=lambda f: int(re.search(r"zero_pp_rank_(\d+)_", os.path.basename(f)).group(1)))
    shards = [torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"] for f in optim_files]
    states = [z.zero_model_state(buffers={}, param_shapes=model_state["param_shapes"],
                                 shared_params=[[k, v] for k, v in model_state.get("shared_params", {}).items()],
                                 ds_version=model_state.get("ds_version"),
                                 frozen_param_shapes=model_state.get("frozen_param_shapes"),
                                 frozen_param_fragments=model_state.get("frozen_param_fragments"))]
    merged = z._get_fp32_state_dict_from_zero2_checkpoint(
        len(shards), [s["single_partition_of_fp32_groups"] for s in shards], states, False,
        shards[0].get("param_alignment_paddings"))
    return {n: t.float() for n, t in z.to_torch_tensor(merged).items()}


def _pipeline_layer_weights(path: str, tensor_rank: int, tensor: int) -> dict[str, torch.Tensor]:
    """ZeRO-0 pipeline: every layer's weights held by `tensor_rank`, named "{layer}.{local}", from the per-layer
    files of all stages (`layer_{i}-model_states.pt`, or `layer_{i}-model_{t}-model_states.pt` with tensor ranks)."""
    suffix = f"-model_{tensor_rank:02d}-model_states.pt" if tensor > 1 else "-model_states.pt"
    out = {}
    for file in sorted(glob.glob(os.path.join(path, "layer_*" + suffix))):
        index = int(re.match(r"layer_(\d+)", os.path.basename(file)).group(1))
        for local, t in torch.load(file, map_location="cpu", weights_only=False).items():
            out[f"{index}.{local}"] = t.float()
    return out
