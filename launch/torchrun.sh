#!/usr/bin/env bash
# Multi-node training with torchrun: run this once on every node, same arguments except --node_rank.
#
#   node 0:  bash launch/torchrun.sh --nnodes 2 --node_rank 0 --master node0.example:29500 CONFIG DS_CONFIG [overrides]
#   node 1:  bash launch/torchrun.sh --nnodes 2 --node_rank 1 --master node0.example:29500 CONFIG DS_CONFIG [overrides]
#
# --master HOST:PORT is the rendezvous endpoint: node 0's address, reachable from every node, and a free
# port there. --nproc_per_node defaults to the GPUs on the node (else 1 CPU rank). Ranks are numbered
# node by node (node_rank × nproc_per_node + local rank).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
usage="usage: bash launch/torchrun.sh --nnodes N --node_rank I --master HOST:PORT [--nproc_per_node G] CONFIG DS_CONFIG [section.key=value ...]"

nnodes="" node_rank="" master="" nproc=""
while [ $# -gt 0 ]; do
    case "$1" in
        --nnodes) nnodes="${2:?$usage}"; shift 2 ;;
        --node_rank|--node-rank) node_rank="${2:?$usage}"; shift 2 ;;
        --master|--rdzv_endpoint|--rdzv-endpoint) master="${2:?$usage}"; shift 2 ;;
        --nproc_per_node|--nproc-per-node) nproc="${2:?$usage}"; shift 2 ;;
        -h|--help) echo "$usage"; exit 0 ;;
        *) break ;;
    esac
done
if [ -z "$nnodes" ] || [ -z "$node_rank" ] || [ -z "$master" ] || [ $# -lt 2 ]; then
    echo "$usage" >&2
    exit 2
fi
case "$master" in
    *:*) ;;
    *) echo "megapile: --master must be HOST:PORT, got '$master'" >&2; exit 2 ;;
esac
config="$1"
ds_config="$2"
shift 2

# shellcheck source=launch/ranks.sh
source "$repo/launch/ranks.sh"   # sets python, gpus, nproc and (on CPU) OMP_NUM_THREADS
echo "megapile: node ${node_rank}/${nnodes}, ${nproc} process(es), rendezvous at ${master}"
exec "$python" -m torch.distributed.run --nnodes "$nnodes" --node_rank "$node_rank" --nproc_per_node "$nproc" \
    --master_addr "${master%:*}" --master_port "${master##*:}" \
    "$repo/megapile/train.py" --deepspeed_config "$ds_config" --config "$config" "$@"
