#!/usr/bin/env bash
# Train on this machine: one process per GPU, or N CPU ranks (gloo) when there is no GPU.
#
#   bash launch/local.sh configs/tiny.yaml ds_configs/zero2.json [section.key=value ...]
#   bash launch/local.sh --nproc 2 configs/tiny.yaml ds_configs/zero2.json train.max_steps=50
#
# --nproc defaults to the number of GPUs, else 1. On CPU each rank gets cores / N threads (OMP_NUM_THREADS).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
usage="usage: bash launch/local.sh [--nproc N] CONFIG DS_CONFIG [section.key=value ...]"

nproc=""
if [ "${1:-}" = "--nproc" ]; then
    nproc="${2:?$usage}"
    shift 2
fi
if [ $# -lt 2 ]; then
    echo "$usage" >&2
    exit 2
fi
config="$1"
ds_config="$2"
shift 2

# shellcheck source=launch/ranks.sh
source "$repo/launch/ranks.sh"   # sets python, gpus, nproc and (on CPU) OMP_NUM_THREADS
echo "megapile: ${nproc} process(es) on $(hostname) ($([ "$gpus" -gt 0 ] && echo "${gpus} GPU(s)" || echo "CPU, ${OMP_NUM_THREADS} thread(s) each"))"
exec "$python" -m torch.distributed.run --standalone --nnodes 1 --nproc_per_node "$nproc" \
    "$repo/megapile/train.py" --deepspeed_config "$ds_config" --config "$config" "$@"
