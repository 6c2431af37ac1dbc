#!/usr/bin/env bash
# The main job on the embedded default, every stage through its launch script:
#   build the tiny model, tokenizer and synthetic world -> pt -> sft
# A finished stage (its output_dir holds all_results.json) is skipped, a half-finished one
# resumes from its last checkpoint, so running this again continues where it stopped.
# Settings (environment): WORK_DIR (default runs/demo), NPROC_PER_NODE (ranks, default 2),
# PRESET (tiny|demo, default demo), WANDB_MODE (offline unless an account is configured).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK_DIR=${WORK_DIR:-runs/demo}
export NPROC_PER_NODE=${NPROC_PER_NODE:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC_PER_NODE > 0 ? $(nproc) / NPROC_PER_NODE : 1 ))}
export TOKENIZERS_PARALLELISM=false
start=$(date +%s)

python -m stages.embedded --output_dir "$WORK_DIR/embedded" --preset "${PRESET:-demo}"

# run_stage NAME [overrides...]: launch/NAME.sh examples/demo/NAME.yaml with paths under WORK_DIR.
run_stage() {
  local name=$1; shift
  local out="$WORK_DIR/$name"
  if [ -f "$out/all_results.json" ]; then
    echo "== $name: already complete in $out, skipped"; return
  fi
  local resume=()
  if compgen -G "$out/checkpoint-*" >/dev/null; then
    resume=(--resume_from_checkpoint last); echo "== $name: resuming from the last checkpoint in $out"
  elif [ -d "$out" ]; then
    resume=(--overwrite_output_dir); echo "== $name: restarting (no checkpoint in $out)"
  fi
  echo "== $name: bash launch/$name.sh examples/demo/$name.yaml --output_dir $out $* ${resume[*]}"
  bash "launch/$name.sh" "examples/demo/$name.yaml" --output_dir "$out" \
    --dataset_dir "$WORK_DIR/embedded/data" "$@" "${resume[@]}"
}

run_stage pt --model_name_or_path "$WORK_DIR/embedded/model"
run_stage sft --model_name_or_path "$WORK_DIR/pt"

echo "== main job done in $(( $(date +%s) - start )) s; outputs under $WORK_DIR"
