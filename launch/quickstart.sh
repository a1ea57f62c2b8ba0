#!/usr/bin/env bash
# The whole pipeline on one CPU machine, no download: build the sample Pile-format corpus, train a
# tokenizer, preprocess to .bin/.idx, train `tiny` with DeepSpeed on 2 CPU ranks, print the validation loss.
# Usage: bash launch/quickstart.sh [WORKDIR] [extra config overrides ...]
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-quickstart}"
shift || true
mkdir -p "$work"
cd "$work"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/megapile/torch_extensions}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"   # one thread per rank: 2 ranks on a 2-core laptop

[ -d data/sample ] || megapile data sample data/sample
[ -f data/tokenizer.json ] || megapile tokenizer train --input 'data/sample/train/*.jsonl.zst' \
    --vocab-size 8192 --output data/tokenizer.json
[ -f data/pile_train.idx ] || megapile preprocess --input 'data/sample/train/*.jsonl.zst' \
    --tokenizer data/tokenizer.json --output-prefix data/pile_train --workers 2
[ -f data/pile_val.idx ] || megapile preprocess --input 'data/sample/val/*.jsonl.zst' \
    --tokenizer data/tokenizer.json --output-prefix data/pile_val --workers 2

# Quiet by default: the launcher's own INFO lines only with --verbose (which train.py takes too). Without a GPU,
# naming the CPU accelerator spares every process DeepSpeed's "Setting accelerator to CPU" warning.
log_level=warning
for arg in "$@"; do [ "$arg" = "--verbose" ] && log_level=info; done
command -v nvidia-smi >/dev/null 2>&1 || export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
deepspeed --log_level "$log_level" --num_gpus 2 "$repo/megapile/train.py" \
    --deepspeed_config "$repo/ds_configs/zero2.json" --config "$repo/configs/tiny.yaml" "$@"
echo "quickstart done: metrics in $work/runs/tiny/metrics.jsonl (plot them: megapile plot $work/runs/tiny)"
