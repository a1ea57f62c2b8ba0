#!/usr/bin/env bash
# Write a hostfile from a SLURM node list, for `deepspeed --hostfile` and `mpirun --hostfile`.
#
#   bash launch/hostfile.sh > hosts                      # inside an allocation: $SLURM_JOB_NODELIST, slots per node
#   bash launch/hostfile.sh 'gpu[01-04]' 8 > hosts       # any node list, 8 slots each
#   bash launch/hostfile.sh --format mpich 'gpu[01-04]' 8 > hosts
#   bash launch/hostfile.sh --deepspeed-env 'gpu[01-04]' 8 > hosts   # also write ./.deepspeed_env
#
# Slots default to the GPUs per node of the allocation, else its tasks per node, else 8.
# Formats: deepspeed and openmpi (the default) write `host slots=N`; mpich writes `host:N`.
# --deepspeed-env writes .deepspeed_env in the current directory: the `deepspeed` launcher reads it there and
# exports its variables on every node, where an ssh session starts with a fresh environment (DeepSpeed itself
# forwards only PYTHON*). It holds those of ENV_VARS below that are set here; run `deepspeed` from this directory.
set -euo pipefail
usage="usage: bash launch/hostfile.sh [--format deepspeed|openmpi|mpich] [--deepspeed-env] [NODELIST [SLOTS]]"
ENV_VARS=(PATH PYTHONPATH LD_LIBRARY_PATH OMP_NUM_THREADS TORCH_EXTENSIONS_DIR GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME WANDB_MODE
          HF_HOME)

format="deepspeed"
deepspeed_env=0
while [ $# -gt 0 ]; do
    case "$1" in
        --format) format="${2:?$usage}"; shift 2 ;;
        --deepspeed-env) deepspeed_env=1; shift ;;
        *) break ;;
    esac
done
nodelist="${1:-${SLURM_JOB_NODELIST:-}}"
if [ -z "$nodelist" ]; then
    echo "megapile: no node list: give one (e.g. 'gpu[01-04]') or run inside a SLURM allocation" >&2
    echo "$usage" >&2
    exit 2
fi
if [ -n "${2:-}" ]; then
    slots="$2"
elif [ "${SLURM_GPUS_ON_NODE:-0}" -gt 0 ]; then
    slots="$SLURM_GPUS_ON_NODE"
elif [ -n "${SLURM_NTASKS_PER_NODE:-}" ]; then
    slots="${SLURM_NTASKS_PER_NODE%%(*}"
else
    slots=8
fi
case "$slots" in
    ''|*[!0-9]*) echo "megapile: SLOTS must be a positive integer, got '$slots'" >&2; exit 2 ;;
esac

# scontrol needs a SLURM configuration; elsewhere megapile expands the list itself.
if ! hosts="$(scontrol show hostnames "$nodelist" 2>/dev/null)" || [ -z "$hosts" ]; then
    repo="$(cd "$(dirname "$0")/.." && pwd)"
    hosts="$(PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" "${PYTHON:-python}" -c \
        'import sys; from megapile.runtime.distributed import LaunchError, expand_nodelist
try: print("\n".join(expand_nodelist(sys.argv[1])))
except LaunchError as e: sys.exit(f"megapile: error: {e}")' \
        "$nodelist")"
fi
while IFS= read -r host; do
    [ -n "$host" ] || continue
    case "$format" in
        deepspeed|openmpi) printf '%s slots=%s\n' "$host" "$slots" ;;
        mpich) printf '%s:%s\n' "$host" "$slots" ;;
        *) echo "megapile: unknown format '$format' (deepspeed, openmpi or mpich)" >&2; exit 2 ;;
    esac
done <<< "$hosts"

if [ "$deepspeed_env" = 1 ]; then
    written=()
    : > .deepspeed_env
    for var in "${ENV_VARS[@]}"; do
        # one KEY=VALUE per line, unquoted: DeepSpeed quotes a value itself (a newline cannot be carried)
        if [ -n "${!var:-}" ] && [[ "${!var}" != *$'\n'* ]]; then
            printf '%s=%s\n' "$var" "${!var}" >> .deepspeed_env
            written+=("$var")
        fi
    done
    echo "megapile: wrote $PWD/.deepspeed_env (${written[*]}) for deepspeed's launcher on every node" >&2
fi
