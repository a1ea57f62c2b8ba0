#!/usr/bin/env bash
# Train on a SLURM allocation: one process per GPU on every node (srun, no ssh), checkpoint before the
# time limit, requeue the same job, resume from the newest checkpoint. No step is lost.
#
#   sbatch slurm/train.sh CONFIG DS_CONFIG [section.key=value ...]
#   sbatch --nodes 4 --gpus-per-node 8 --time 04:00:00 slurm/train.sh configs/neox-20b.yaml ds_configs/zero1.json
#   sbatch --gpus-per-node 0 --ntasks-per-node 2 --cpus-per-task 1 slurm/train.sh configs/tiny.yaml ds_configs/zero2.json
#                                                                        # a CPU partition: N ranks per node, gloo
#
# Processes per node: the GPUs on the node (SLURM_GPUS_ON_NODE), else --ntasks-per-node. Every rank gets
# RANK/LOCAL_RANK/WORLD_SIZE from SLURM_PROCID/SLURM_LOCALID/SLURM_STEP_NUM_TASKS, MASTER_ADDR = the first host
# of the allocation and MASTER_PORT = 20000 + job id % 20000 (export either to override).
# Logs: the batch log ${SLURM_JOB_NAME}-${SLURM_JOB_ID}.out in the submit directory, and one file per rank in
# ${MEGAPILE_LOG_DIR:-logs}/${SLURM_JOB_NAME}-${SLURM_JOB_ID}/rank<N>.log; every restart appends to them.
#
# Requeue: SLURM sends USR1 to this script 300 s before the time limit (--signal=B:USR1@300; make it longer
# than one step plus a checkpoint save). The script forwards it to srun, srun to every rank; the ranks
# finish the step, save and exit 75 (megapile.runtime.signals.EXIT_CHECKPOINTED), and the script runs
# `scontrol requeue`: the same job id starts again later, resumes (checkpoint.resume: auto) and logs
# SLURM_RESTART_COUNT. Preemption's SIGTERM takes the same path. Exit 0 = finished, no requeue. Any other exit
# is a crash: requeued at most MEGAPILE_MAX_CRASHES times in a row (default 2; a checkpointed exit resets
# the count), then the job fails with the training's exit code. `scancel` also makes the ranks save, but a
# cancelled job is never requeued.
#
#SBATCH --job-name=megapile
#SBATCH --nodes=1
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -uo pipefail

EXIT_CHECKPOINTED=75
if [ $# -lt 2 ]; then
    echo "usage: sbatch [sbatch options] slurm/train.sh CONFIG DS_CONFIG [section.key=value ...]" >&2
    exit 2
fi
config="$1"
ds_config="$2"
shift 2
if [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "slurm/train.sh runs under sbatch (for one machine use launch/local.sh)" >&2
    exit 2
fi

# sbatch runs a copy of this script from its spool folder: find the repository from the submit directory.
repo="${MEGAPILE_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
if [ -f "$repo/megapile/train.py" ]; then
    train=("${PYTHON:-python}" "$repo/megapile/train.py")
else
    train=("${PYTHON:-python}" -m megapile.train)   # an installed megapile
fi

restart="${SLURM_RESTART_COUNT:-0}"
nodes="${SLURM_JOB_NUM_NODES:-1}"
if [ "${SLURM_GPUS_ON_NODE:-0}" -gt 0 ]; then
    per_node="$SLURM_GPUS_ON_NODE"
else
    per_node="${SLURM_NTASKS_PER_NODE:-1}"
    per_node="${per_node%%(*}"   # "2(x3)" when nodes differ: take the first count
fi
world=$((nodes * per_node))
log_dir="${MEGAPILE_LOG_DIR:-logs}/${SLURM_JOB_NAME:-megapile}-${SLURM_JOB_ID}"
mkdir -p "$log_dir"

export MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"
export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
export LOCAL_WORLD_SIZE="$per_node"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"

echo "megapile: job ${SLURM_JOB_ID} start $(date -u +%FT%TZ), restart ${restart}, ${nodes} node(s) × ${per_node}" \
     "process(es) = world ${world}, master ${MASTER_ADDR}:${MASTER_PORT}, rank logs in ${log_dir}/"

srun_pid=""
interrupted=0
# shellcheck disable=SC2317  # called from the traps below
forward() {
    interrupted=1
    echo "megapile: $1 received $(date -u +%FT%TZ): every rank finishes its step, saves a checkpoint and exits ${EXIT_CHECKPOINTED}"
    if [ -n "$srun_pid" ]; then
        kill -s "$1" "$srun_pid" 2>/dev/null || true   # srun forwards it to every task
    fi
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

cpus=()
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
    cpus=(--cpus-per-task "$SLURM_CPUS_PER_TASK")
fi
# --wait: once one rank has exited, the others get 120 s before srun ends them (a crashed rank must not
# leave the rest hanging in a collective until its timeout). The single-quoted part expands in each task.
# shellcheck disable=SC2016
srun --nodes "$nodes" --ntasks "$world" --ntasks-per-node "$per_node" "${cpus[@]}" \
     --kill-on-bad-exit=0 --wait=120 --output "$log_dir/rank%t.log" --open-mode=append \
     bash -c 'export RANK="$SLURM_PROCID" LOCAL_RANK="$SLURM_LOCALID" WORLD_SIZE="$SLURM_STEP_NUM_TASKS"
              echo "megapile: job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} rank $RANK/$WORLD_SIZE on $(hostname)"
              exec "$@"' megapile-rank \
     "${train[@]}" --deepspeed_config "$ds_config" --config "$config" "$@" &
srun_pid=$!
while :; do
    interrupted=0
    wait "$srun_pid"
    rc=$?
    [ "$interrupted" = 1 ] || break   # a trapped signal interrupts `wait`; wait again for srun's real status
done

crash_file="$log_dir/consecutive_crashes"
case "$rc" in
    0)
        echo "megapile: training finished (job ${SLURM_JOB_ID}, ${restart} restart(s)); not requeueing"
        rm -f "$crash_file"
        exit 0 ;;
    "$EXIT_CHECKPOINTED")
        rm -f "$crash_file"
        why="checkpoint saved" ;;
    *)
        crashes=$(( $(cat "$crash_file" 2>/dev/null || echo 0) + 1 ))
        echo "$crashes" > "$crash_file"
        if [ "$crashes" -gt "${MEGAPILE_MAX_CRASHES:-2}" ]; then
            echo "megapile: training failed with exit code ${rc}, ${crashes} times in a row: giving up" \
                 "(MEGAPILE_MAX_CRASHES=${MEGAPILE_MAX_CRASHES:-2}); see ${log_dir}/rank*.log" >&2
            exit "$rc"
        fi
        why="training failed with exit code ${rc} (crash ${crashes} in a row, at most ${MEGAPILE_MAX_CRASHES:-2})" ;;
esac
trap '' TERM   # requeueing ends this script's step with SIGTERM; the exit below is ours
# Requeue only a running job: after `scancel` (state CANCELLED) the ranks saved and exited 75 too, and the
# user wants the job gone; when a node failed, SLURM is already ending the job (COMPLETING) and requeues it
# itself (and its own preemption requeue needs no help). One line either way, said once the state is known.
state="$(scontrol show job "$SLURM_JOB_ID" -o 2>/dev/null | tr ' ' '\n' | sed -n 's/^JobState=//p')"
if [ "$state" != "RUNNING" ]; then
    echo "megapile: ${why}; job ${SLURM_JOB_ID} is ${state:-gone}, not running, so this script does not requeue it" \
         "(SLURM requeues a job it ends for a failed node by itself; otherwise resubmit the same command to" \
         "resume from the checkpoint)" >&2
    exit "$rc"
fi
echo "megapile: ${why}; requeueing job ${SLURM_JOB_ID} (restart $((restart + 1)) will resume from the last checkpoint)"
if ! scontrol requeue "$SLURM_JOB_ID"; then
    echo "megapile: scontrol requeue ${SLURM_JOB_ID} failed (was the job cancelled, or submitted with" \
         "--no-requeue?); resubmit the same command to resume" >&2
    exit "$rc"
fi
exit 0
