#!/usr/bin/env bash
# Evaluate a checkpoint on a SLURM allocation: `megapile eval` under srun, one process per GPU (or per
# --ntasks-per-node on a CPU partition), with RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set as in
# slurm/train.sh. Output goes to ${SLURM_JOB_NAME}-${SLURM_JOB_ID}.out in the submit directory.
#
#   sbatch slurm/eval.sh runs/pythia-1b/checkpoints 'pile/val.jsonl.zst' [more megapile eval args ...]
#   sbatch --gpus-per-node 0 --ntasks-per-node 1 slurm/eval.sh runs/tiny/checkpoints 'data/sample/val/*.jsonl.zst'
#
#SBATCH --job-name=megapile-eval
#SBATCH --nodes=1
#SBATCH --gpus-per-node=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=02:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

if [ $# -lt 2 ]; then
    echo "usage: sbatch [sbatch options] slurm/eval.sh CHECKPOINT_DIR DATA [megapile eval args ...]" >&2
    exit 2
fi
checkpoint="$1"
data="$2"
shift 2

repo="${MEGAPILE_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
[ -f "$repo/megapile/cli.py" ] && export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
nodes="${SLURM_JOB_NUM_NODES:-1}"
if [ "${SLURM_GPUS_ON_NODE:-0}" -gt 0 ]; then
    per_node="$SLURM_GPUS_ON_NODE"
else
    per_node="${SLURM_NTASKS_PER_NODE:-1}"
    per_node="${per_node%%(*}"
fi
export MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"
export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
export LOCAL_WORLD_SIZE="$per_node"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
echo "megapile: eval job ${SLURM_JOB_ID}: ${checkpoint} on ${data}, ${nodes} node(s) × ${per_node} process(es)"

cpus=()
[ -n "${SLURM_CPUS_PER_TASK:-}" ] && cpus=(--cpus-per-task "$SLURM_CPUS_PER_TASK")
# shellcheck disable=SC2016  # the single-quoted part expands in each task
exec srun --nodes "$nodes" --ntasks "$((nodes * per_node))" --ntasks-per-node "$per_node" "${cpus[@]}" \
    --kill-on-bad-exit=1 \
    bash -c 'export RANK="$SLURM_PROCID" LOCAL_RANK="$SLURM_LOCALID" WORLD_SIZE="$SLURM_STEP_NUM_TASKS"; exec "$@"' \
    megapile-rank "${PYTHON:-python}" -m megapile.cli eval --checkpoint "$checkpoint" --data "$data" "$@"
