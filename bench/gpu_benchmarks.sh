#!/usr/bin/env bash
# The CPU benchmarks on one GPU, in bf16, on the real model, in one script meant to finish in under 8 minutes.
#
#   bash bench/gpu_benchmarks.sh [OUT_DIR]        # default /tmp/gpu_bench; one log per benchmark there
#
# Every benchmark keeps its like-for-like rows, its 3 alternating repeats and its MFU column (against
# the GPU's bf16 matmul peak, measured in the run); sizes are those of the CPU runs or larger, since a
# GPU step is short. Each benchmark gets a time limit, so one that hangs cannot take the others' time;
# the last lines give each one's wall time and exit status.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/gpu_bench}
mkdir -p "$OUT"
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "bench/gpu_benchmarks.sh: no CUDA device is visible to torch; run it on a GPU machine." >&2
    exit 2
fi
export TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled

declare -A LIMIT=([sft]=110 [ppo]=150 [projector]=80 [encode]=70 [online]=50)
run() {  # name, then the command
    local name=$1 start status
    shift
    start=$(date +%s)
    timeout "${LIMIT[$name]}" "$@" >"$OUT/$name.log" 2>&1
    status=$?
    echo "$name: $(( $(date +%s) - start )) s, exit $status, log $OUT/$name.log" | tee -a "$OUT/summary.txt"
    grep -v "^ *repeat" "$OUT/$name.log" | tail -n 14
}

: >"$OUT/summary.txt"
started=$(date +%s)
run sft python bench/sft_throughput.py --device cuda --dtypes bf16 --steps 8 --repeats 3 --work_dir "$OUT/sft"
run ppo python bench/ppo_memory.py --bf16 true --repeats 3 --work_dir "$OUT/ppo"
run projector python bench/projector_throughput.py --bf16 true --repeats 3 --steps 4 --padded_steps 8 \
    --work_dir "$OUT/projector"
run encode python bench/encode_throughput.py --device cuda --passages 32 --original_passages 8 --repeats 3 \
    --dtypes bf16 --skip "peft fp32" "batched fp32" --bank_size 64 --load_count 16 --work_dir "$OUT/encode"
run online python bench/online_cost.py --bf16 true --repeats 3 --work_dir "$OUT/online"
echo "all: $(( $(date +%s) - started )) s (goal: under 480)" | tee -a "$OUT/summary.txt"
