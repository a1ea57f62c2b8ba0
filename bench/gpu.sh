#!/usr/bin/env bash
# megapile on one GPU, offline, in about 8 minutes: install the carried wheels, then for the pythia-160m and
# pythia-1b shapes run megapile/train.py itself (DeepSpeed's bf16 engine, ZeRO-1; for pythia-160m also ZeRO-2,
# model.compile and flash-attn when installed) for a few dozen steps on random tokens and print tokens/s,
# TFLOP/s, MFU against the datasheet peak and against a bf16 matmul measured in this run, and peak memory;
# then transformers' GPTNeoX + AdamW on the same GPU side by side, and peak memory per option (bench/memory.py).
#
#   bash bench/gpu_wheels.sh            # first, on a machine with internet: fills bench/wheels/
#   bash bench/gpu.sh                   # on the GPU machine (PyTorch with CUDA installed, no internet needed)
#   bash bench/gpu.sh --cpu-smoke       # the same flow on CPU with the tiny preset and 2 steps: checks the script
#   bash bench/gpu.sh --dry-run         # prints every command the GPU run would run, then runs --cpu-smoke
#                                       # (every step of the script except the CUDA kernels)
#
# Environment: RESULTS (default runs/gpu-bench: logs, data, metrics), STEPS (default 30 training steps),
# SKIP_COMPILE=1 (no model.compile run), SKIP_OFFLOAD=1 (no ZeRO-2 offload memory rows: they JIT-compile
# DeepSpeed's CPU Adam, about a minute, and need a C++ compiler).
#
# If installing fails with "No matching distribution" for a binary package (pydantic-core, psutil, tokenizers,
# ...), the machine's Python differs from the wheels carried: note `python -V` (printed below) and rebuild on a
# machine with internet with `GPU_PYTHONS=3.X bash bench/gpu_wheels.sh` (ARCH=aarch64 for ARM hosts), or install
# that one package from the GPU machine's own package mirror. deepspeed, megapile and transformers are
# pure-Python wheels and install on any Python 3.10+.
set -euo pipefail

cd "$(dirname "$0")/.."
SMOKE=0 DRY=0
case "${1:-}" in
    --cpu-smoke) SMOKE=1 ;;
    --dry-run) DRY=1 ;;
    "") ;;
    *) echo "usage: bash bench/gpu.sh [--cpu-smoke | --dry-run]" >&2; exit 2 ;;
esac
RESULTS=${RESULTS:-runs/gpu-bench}
mkdir -p "$RESULTS"
export WANDB_MODE=offline WANDB_SILENT=true TOKENIZERS_PARALLELISM=false
# RESULTS may be relative (to the repository) or absolute; the JIT-built ops go beside the results either way
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$(cd "$RESULTS" && pwd)/torch_extensions}
if [ "$SMOKE" = 1 ]; then
    PRESETS=(tiny); STEPS=${STEPS:-2}; LOG_EVERY=1; DEVICE=cpu; DTYPE=fp32; BENCH_STEPS=(--steps 2 --warmup 1)
    MEM=(--preset tiny --device cpu --dtype fp32 --steps 1 --options default checkpoint_all)  # two of them: the flow
else
    PRESETS=(pythia-160m pythia-1b); STEPS=${STEPS:-30}; LOG_EVERY=5; DEVICE=cuda; DTYPE=bf16
    BENCH_STEPS=(--steps 8 --warmup 3); MEM=(--preset pythia-160m --device cuda --dtype bf16 --steps 3)
    [ "$DRY" = 1 ] || export DS_ACCELERATOR=cuda
fi

section() { echo; echo "== $* (at ${SECONDS}s)"; }
run() {  # a command of the benchmark: shown, and run unless this is the --dry-run's listing
    echo "+ $*"
    if [ "$DRY" = 1 ]; then return 0; fi
    "$@"
}

section "1. install the carried wheels"
if [ "$DRY" = 1 ]; then
    echo "(listing the GPU run's commands; the CPU smoke run of the same script follows)"
elif python -c 'import deepspeed, transformers, hjson, pydantic' 2>/dev/null; then
    echo "deepspeed and transformers already importable: nothing to install"
elif [ -d bench/wheels ]; then
    python -m pip install --no-index --find-links bench/wheels --no-deps bench/wheels/megapile-*.whl
    python -m pip install --no-index --find-links bench/wheels deepspeed transformers hjson pydantic msgpack ninja \
        psutil py-cpuinfo einops pyyaml safetensors tokenizers zstandard tqdm nvidia-ml-py || {
        echo "gpu.sh: installing the carried wheels failed on $(python -V 2>&1); see the top of bench/gpu.sh" >&2
        exit 1
    }
else
    echo "gpu.sh: deepspeed is not installed and bench/wheels/ is missing: run bash bench/gpu_wheels.sh first" >&2
    exit 1
fi

section "2. machine"
run python - "$DEVICE" <<'EOF'
import sys, torch, deepspeed, transformers
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"deepspeed {deepspeed.__version__}, transformers {transformers.__version__}")
if sys.argv[1] == "cuda":
    if not torch.cuda.is_available():
        sys.exit("gpu.sh: torch sees no CUDA device (use --cpu-smoke on a machine without one)")
    p = torch.cuda.get_device_properties(0)
    print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} visible")
EOF

section "3. the matmul peak measured in this run ($DTYPE)"
run python - "$DEVICE" "$DTYPE" "$RESULTS/matmul_tflops.txt" <<'EOF'
import sys, torch
from megapile.training.flops import gpu_peak_tflops, measure_matmul_tflops
device, dtype = torch.device(sys.argv[1]), {"bf16": torch.bfloat16, "fp32": torch.float32}[sys.argv[2]]
n = 8192 if device.type == "cuda" else 1024
best = max(measure_matmul_tflops(device, dtype, n=n, seconds=1.0) for _ in range(3))
sheet = gpu_peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
print(f"{sys.argv[2]} {n}x{n} matmul: {best:.1f} TFLOP/s measured" +
      (f"; datasheet {sheet:.0f} TFLOP/s ({best / sheet:.0%} of it)" if sheet else ""))
open(sys.argv[3], "w").write(f"{best}\n")
EOF
MATMUL=$(cat "$RESULTS/matmul_tflops.txt" 2>/dev/null || echo 1)

section "4. random-token training data"
run python - "$RESULTS/random" <<'EOF'
import sys
import numpy as np
from megapile.data.indexed import IndexedDatasetWriter
rng = np.random.default_rng(0)
lengths = np.full(4096, 2049)  # whole 2048-token samples; random tokens of the 50,277-token GPT-NeoX vocabulary
with IndexedDatasetWriter(sys.argv[1], np.uint16) as w:
    w.add_documents(rng.integers(0, 50277, int(lengths.sum()), dtype=np.uint16), lengths)
    w.finalize()
print(f"{sys.argv[1]}: {int(lengths.sum()):,} tokens")
EOF

train() {  # train PRESET NAME ZERO_STAGE [overrides...]: megapile/train.py, one process, bf16 on a GPU
    local preset=$1 name=$2 stage=$3
    shift 3
    local config=configs/$preset.yaml micro extra=()
    if [ "$SMOKE" = 1 ]; then
        config=configs/tiny.yaml; micro=8; extra=(model.vocab_size=50277)
    else
        micro=$(python -c "import yaml; print(yaml.safe_load(open('$config'))['train']['micro_batch_size'])")
    fi
    rm -rf "${RESULTS:?}/${name:?}"
    local cmd=(python megapile/train.py --config "$config" parallel.zero_stage="$stage"
        data.train="$RESULTS/random" data.valid=null data.tokenizer=null "${extra[@]}"
        train.max_steps="$STEPS" train.log_every="$LOG_EVERY" train.micro_batch_size="$micro"
        train.global_batch_size="$micro" train.dtype="$DTYPE" train.eval_every=0
        checkpoint.every=0 checkpoint.resume=none checkpoint.keep_last=1 logging.run_dir="$RESULTS/$name"
        logging.wandb=false "$@")
    echo "+ ${cmd[*]}"
    if [ "$DRY" = 1 ]; then return 0; fi
    "${cmd[@]}" 2>&1 | tee "$RESULTS/$name.log" | grep -E "megapile:|throughput over|error" || true
    rm -rf "$RESULTS/$name/checkpoints"  # the end-of-run checkpoint (16 GB for 1b) is not what we measure
    local line
    line=$(grep "throughput over" "$RESULTS/$name.log" || true)
    if [ -z "$line" ]; then
        echo "  $name: no throughput summary; the end of $RESULTS/$name.log:"; tail -5 "$RESULTS/$name.log"
        return 0
    fi
    python - "$line" "$MATMUL" "$name" <<'EOF'
import re, sys
line, matmul, name = sys.argv[1], float(sys.argv[2]), sys.argv[3]
tflops = float(re.search(r"([\d.]+) TFLOP/s per device", line).group(1))
print(f"  {name}: {tflops:.3g} TFLOP/s per device = MFU {tflops / matmul:.1%} of the matmul measured in this run "
      f"({matmul:.3g} TFLOP/s)")
EOF
}

section "5. megapile training (megapile/train.py): ZeRO-1, $DTYPE, $STEPS steps, random tokens"
for preset in "${PRESETS[@]}"; do
    train "$preset" "$preset" 1
done
section "5b. ${PRESETS[0]} with ZeRO-2 (gradients partitioned; the reduction overlaps the backward on GPUs)"
train "${PRESETS[0]}" "${PRESETS[0]}-zero2" 2
if [ "${SKIP_COMPILE:-0}" != 1 ]; then
    section "5c. ${PRESETS[0]} with model.compile=true (each block compiled; first interval holds the compilation)"
    train "${PRESETS[0]}" "${PRESETS[0]}-compiled" 1 model.compile=true
fi
if [ "$DRY" = 1 ] || python -c 'import flash_attn' 2>/dev/null; then
    section "5d. ${PRESETS[0]} with model.attention=flash_attn (only where flash-attn is installed)"
    train "${PRESETS[0]}" "${PRESETS[0]}-flash" 1 model.attention=flash_attn
fi

section "6. transformers GPTNeoX + AdamW against megapile's model, same GPU, same batch, $DTYPE autocast"
for preset in "${PRESETS[@]}"; do
    run python bench/train_throughput.py --preset "$preset" --device "$DEVICE" --dtype "$DTYPE" "${BENCH_STEPS[@]}" \
        || echo "  $preset: train_throughput failed"
done

section "7. peak memory per option (each in a fresh process)"
run python bench/memory.py "${MEM[@]}" || echo "  memory.py: an option failed"
if [ "${SKIP_OFFLOAD:-0}" != 1 ]; then
    run timeout 300 python bench/memory.py "${MEM[@]}" --zero --options zero2 zero2_offload \
        || echo "  ZeRO-2 offload rows failed or timed out (SKIP_OFFLOAD=1 skips them)"
fi

if [ "$DRY" = 1 ]; then
    section "the GPU run's commands listed; now every step on CPU (bash bench/gpu.sh --cpu-smoke)"
    exec bash "$0" --cpu-smoke
fi
section "done in ${SECONDS}s; logs and metrics under $RESULTS"
