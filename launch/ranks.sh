# shellcheck shell=bash
# Sourced by launch/local.sh and launch/torchrun.sh: how many ranks this node runs, and CPU threads per rank.
# Reads $nproc (empty: one rank per GPU, else 1) and $PYTHON; sets $python, $gpus and $nproc, and on CPU
# exports OMP_NUM_THREADS = cores / ranks unless it is set already.
python="${PYTHON:-python}"
gpus="$("$python" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
if [ -z "$nproc" ]; then
    nproc=$(( gpus > 0 ? gpus : 1 ))
fi
if [ "$gpus" -eq 0 ] && [ -z "${OMP_NUM_THREADS:-}" ]; then
    cores="$(nproc)"
    export OMP_NUM_THREADS=$(( cores / nproc > 0 ? cores / nproc : 1 ))
fi
