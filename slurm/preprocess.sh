#!/usr/bin/env bash
# Tokenize the Pile with a SLURM array job: array task i preprocesses the i-th input shard (sorted), writing
# PREFIX_<shard>.bin/.idx/.json (shard = the file name without .jsonl.zst). Tasks are independent, so a failed
# shard can be rerun alone (sbatch --array=7 ...).
#
#   bash slurm/preprocess.sh 'pile/train/*.jsonl.zst' data/tokenizer.json data/pile_train   # prints the sbatch line
#   sbatch --array=0-29 slurm/preprocess.sh 'pile/train/*.jsonl.zst' data/tokenizer.json data/pile_train
#   sbatch --array=0-29%8 --cpus-per-task 32 slurm/preprocess.sh pile/train data/tokenizer.json data/pile_train
#
# INPUT is a quoted glob or a folder of *.jsonl.zst; extra arguments go to `megapile preprocess`
# (e.g. --split-by-component). Workers = --cpus-per-task. Train on all shards with a list of prefixes in data.train.
#
#SBATCH --job-name=megapile-preprocess
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --time=04:00:00
#SBATCH --output=%x-%A_%a.out
set -euo pipefail

if [ $# -lt 3 ]; then
    echo "usage: sbatch --array=0-<shards-1> slurm/preprocess.sh INPUT_GLOB_OR_DIR TOKENIZER OUTPUT_PREFIX [preprocess args ...]" >&2
    exit 2
fi
input="$1"
input_arg="$1"
tokenizer="$2"
prefix="$3"
shift 3

[ -d "$input" ] && input="${input%/}/*.jsonl.zst"
shopt -s nullglob
# Glob only, no word splitting: a path with spaces stays one word.
# shellcheck disable=SC2206
IFS=$'\n' shards=($input)
unset IFS
if [ "${#shards[@]}" -eq 0 ]; then
    echo "megapile: no input shard matches '$input'" >&2
    exit 1
fi
if [ -z "${SLURM_ARRAY_TASK_ID:-}" ]; then
    echo "megapile: ${#shards[@]} shard(s) match '$input'; submit one array task per shard:" >&2
    printf 'sbatch --array=0-%d %q %q %q %q' "$((${#shards[@]} - 1))" "$0" "$input_arg" "$tokenizer" "$prefix" >&2
    if [ $# -gt 0 ]; then printf ' %q' "$@" >&2; fi
    echo >&2
    exit 2
fi
task="$SLURM_ARRAY_TASK_ID"
if [ "$task" -ge "${#shards[@]}" ]; then
    echo "megapile: array task ${task} has no shard: only ${#shards[@]} match '$input' (use --array=0-$((${#shards[@]} - 1)))" >&2
    exit 1
fi
shard="${shards[$task]}"
name="$(basename "$shard")"
name="${name%%.*}"

repo="${MEGAPILE_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
[ -f "$repo/megapile/cli.py" ] && export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
echo "megapile: array job ${SLURM_ARRAY_JOB_ID:-?} task ${task}: ${shard} -> ${prefix}_${name}"
exec "${PYTHON:-python}" -m megapile.cli preprocess --input "$shard" --tokenizer "$tokenizer" \
    --output-prefix "${prefix}_${name}" --workers "${SLURM_CPUS_PER_TASK:-1}" --no-progress "$@"
