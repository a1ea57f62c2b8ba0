#!/usr/bin/env bash
# Train under OpenMPI's mpirun: N processes spread over the hosts of a hostfile (launch/hostfile.sh writes one).
#
#   bash launch/mpirun.sh -np 16 --hostfile hosts CONFIG DS_CONFIG [section.key=value ...]
#   bash launch/mpirun.sh -np 2 CONFIG DS_CONFIG                      # this machine only
#
# megapile reads the ranks from OMPI_COMM_WORLD_*. MASTER_ADDR defaults to the first host of the hostfile
# (this host without one) and MASTER_PORT to 29500; export them to choose. Without MASTER_ADDR in the
# environment megapile/train.py would agree on rank 0's host through mpi4py instead (plain `mpirun ... python
# megapile/train.py`). Extra mpirun options: MPIRUN_ARGS="--mca btl_tcp_if_include eth0".
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
usage="usage: bash launch/mpirun.sh -np N [--hostfile FILE] CONFIG DS_CONFIG [section.key=value ...]"

np="" hostfile=""
while [ $# -gt 0 ]; do
    case "$1" in
        -np|-n|--np) np="${2:?$usage}"; shift 2 ;;
        -hostfile|--hostfile) hostfile="${2:?$usage}"; shift 2 ;;
        -h|--help) echo "$usage"; exit 0 ;;
        *) break ;;
    esac
done
if [ -z "$np" ] || [ $# -lt 2 ]; then
    echo "$usage" >&2
    exit 2
fi
config="$1"
ds_config="$2"
shift 2

mpi_args=(-np "$np" --bind-to none)
if [ -n "$hostfile" ]; then
    [ -f "$hostfile" ] || { echo "megapile: hostfile '$hostfile' not found" >&2; exit 2; }
    mpi_args+=(--hostfile "$hostfile")
    first_host="$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$hostfile")"
    first_host="${first_host%%:*}"   # MPICH style host:slots
else
    first_host="$(hostname)"
fi
if [ "$(id -u)" -eq 0 ]; then
    mpi_args+=(--allow-run-as-root)
fi
export MASTER_ADDR="${MASTER_ADDR:-$first_host}"
export MASTER_PORT="${MASTER_PORT:-29500}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
for var in MASTER_ADDR MASTER_PORT OMP_NUM_THREADS PATH PYTHONPATH TORCH_EXTENSIONS_DIR WANDB_MODE WANDB_API_KEY; do
    if [ -n "${!var:-}" ]; then
        mpi_args+=(-x "$var")
    fi
done
read -r -a extra <<< "${MPIRUN_ARGS:-}"
echo "megapile: mpirun -np ${np}${hostfile:+ on the hosts in $hostfile}, master ${MASTER_ADDR}:${MASTER_PORT}"
exec mpirun "${mpi_args[@]}" "${extra[@]}" "${PYTHON:-python}" "$repo/megapile/train.py" \
    --deepspeed_config "$ds_config" --config "$config" "$@"
