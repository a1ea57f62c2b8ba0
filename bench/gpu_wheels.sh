#!/usr/bin/env bash
# Build every wheel bench/gpu.sh installs on a GPU machine that has PyTorch but no internet, into bench/wheels/
# (git-ignored). Run it here, with internet, then copy the repository (wheels included) to the GPU machine.
#
#   bash bench/gpu_wheels.sh                          # binary wheels for CPython 3.10, 3.11, 3.12 and 3.13
#   GPU_PYTHONS="3.11" bash bench/gpu_wheels.sh       # only the GPU machine's Python version(s)
#
# Pure-Python wheels (one for every Python):
#   deepspeed   published only as a source archive: built here with `pip wheel --no-deps`. Its C++/CUDA ops are
#               not prebuilt (DS_BUILD_OPS=0, DeepSpeed's default) and are compiled just in time on first use;
#               gpu.sh uses none by default (ZeRO-1, torch's fused AdamW), only the optional offload row does.
#   megapile    this repository, installed with --no-deps on the GPU machine.
#   transformers, hjson, pydantic, einops, py-cpuinfo, tqdm, packaging, ... (the baseline and DeepSpeed's deps)
# Binary wheels, one per Python version in GPU_PYTHONS (manylinux, x86_64 unless ARCH says otherwise): pydantic-core, msgpack, psutil, ninja,
# tokenizers, safetensors, regex, pyyaml, zstandard, hf-xet, numpy. If the GPU machine runs another Python or
# architecture, gpu.sh says which package failed: rebuild with GPU_PYTHONS set to its version (or
# ARCH=aarch64 for ARM hosts such as GH200).
set -euo pipefail

cd "$(dirname "$0")/.."
OUT=bench/wheels
GPU_PYTHONS=${GPU_PYTHONS:-"3.10 3.11 3.12 3.13"}
ARCH=${ARCH:-x86_64}
DEEPSPEED_VERSION=${DEEPSPEED_VERSION:-$(python -c 'from importlib.metadata import version; print(version("deepspeed"))')}
TRANSFORMERS_VERSION=${TRANSFORMERS_VERSION:-$(python -c 'from importlib.metadata import version; print(version("transformers"))')}
mkdir -p "$OUT"

echo "== deepspeed $DEEPSPEED_VERSION (from its source archive) and megapile: pure-Python wheels"
DS_BUILD_OPS=0 python -m pip wheel --no-deps --wheel-dir "$OUT" "deepspeed==$DEEPSPEED_VERSION"
python -m pip wheel --no-deps --wheel-dir "$OUT" .

# What gpu.sh imports besides torch: DeepSpeed's requirements, megapile's (without datasets/wandb/matplotlib,
# which training with logging.wandb=false does not import) and transformers with its requirements.
DEPS=(hjson pydantic msgpack ninja psutil py-cpuinfo einops packaging tqdm numpy pyyaml safetensors tokenizers
      zstandard "transformers==$TRANSFORMERS_VERSION")
for py in $GPU_PYTHONS; do
    echo "== binary and pure-Python dependencies for CPython $py (linux $ARCH)"
    python -m pip download --only-binary=:all: --dest "$OUT" --python-version "$py" --implementation cp \
        --platform "manylinux_2_28_$ARCH" --platform "manylinux2014_$ARCH" --platform "manylinux_2_17_$ARCH" \
        --platform "linux_$ARCH" "${DEPS[@]}"
done
# nvidia-ml-py is a soft dependency of DeepSpeed on GPUs (pure Python); carry it too.
python -m pip download --only-binary=:all: --no-deps --dest "$OUT" nvidia-ml-py

find "$OUT" -maxdepth 1 -type f -printf "  %f\n" | sort
du -sh "$OUT"
