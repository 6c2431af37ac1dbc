#!/usr/bin/env bash
# The main job on the embedded default, every stage through its launch script:
#   build the tiny model, tokenizer and synthetic world -> pt -> sft -> rm -> ppo
#   -> export (sft merged: the frozen base of DyPRAG) -> augment -> encode -> projector
#   -> evaluation (vanilla / RAG / PRAG / PRAG-Combine / DyPRAG / DyPRAG-Combine) -> report
# A stage that finished (its output_dir holds .pipeline_complete) is skipped; a half-finished
# one resumes where its stage can (pt/sft/rm from their last checkpoint, encode from its
# finished bank shards, projector from its last checkpoint) and restarts otherwise, so running
# this again continues where it stopped. Re-run one stage alone: delete its folder (or its
# .pipeline_complete) and run this again, or call its launch script with the command printed.
# Settings (environment): WORK_DIR (default runs/demo), NPROC_PER_NODE (ranks, default 2),
# PRESET (tiny|demo, default demo), STAGES (space-separated subset to run, default all),
# DEMO_SCALE (reduced|full: reduced shortens every stage, for tests), BF16 (true|false, default:
# true where bf16 is native: a GPU, or a CPU with AVX512-BF16/AMX), WANDB_MODE (offline unless an
# account is configured), WANDB_RUN_GROUP (default: the W&B group of the demo).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK_DIR=${WORK_DIR:-runs/demo}
export NPROC_PER_NODE=${NPROC_PER_NODE:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC_PER_NODE > 0 ? $(nproc) / NPROC_PER_NODE : 1 ))}
export TOKENIZERS_PARALLELISM=false
STAGES=${STAGES:-"pt sft rm ppo export augment encode projector prag_eval report"}
DATA="$WORK_DIR/embedded/data"
BASE="$WORK_DIR/sft_merged"
start=$(date +%s)

# Emulated bf16 (a CPU without AVX512-BF16/AMX) is ~10x slower than fp32: one training step of the
# demo model took 1.9 s in bf16 autocast against 0.18 s in fp32 on the 2-core AVX2 dev box.
if [ -z "${BF16:-}" ]; then
  BF16=false
  if grep -qE 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null \
      || python -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    BF16=true
  fi
fi
echo "== precision: bf16=$BF16 (set BF16=true|false to choose)"

# Reduced: a few steps per stage and a handful of questions (the pipeline test).
REDUCED_TRAIN=() REDUCED_RECORDS=()
if [ "${DEMO_SCALE:-full}" = reduced ]; then
  REDUCED_TRAIN=(--max_steps 3 --save_steps 2)
  REDUCED_RECORDS=(--max_samples 6)
fi

python -m stages.embedded --output_dir "$WORK_DIR/embedded" --preset "${PRESET:-demo}"

wants() { [[ " $STAGES " == *" $1 "* ]]; }
is_complete() { [ -f "$WORK_DIR/$1/.pipeline_complete" ]; }

# run_stage NAME RESUME_FLAGS... -- OVERRIDES...: launch/NAME.sh examples/demo/NAME.yaml with paths under
# WORK_DIR; RESUME_FLAGS are added when the output_dir exists (a stopped run), --overwrite_output_dir
# when that stage cannot resume. The config's runs/demo paths are replaced by WORK_DIR's.
run_stage() {
  local name=$1; shift
  local resume_flags=()
  while [ "$1" != "--" ]; do resume_flags+=("$1"); shift; done; shift
  local out="$WORK_DIR/$name"
  if is_complete "$name"; then echo "== $name: already complete in $out, skipped"; return; fi
  local extra=()
  if [ -d "$out" ]; then
    if [ ${#resume_flags[@]} -gt 0 ]; then
      extra=("${resume_flags[@]}"); echo "== $name: continuing the stopped run in $out"
    else
      extra=(--overwrite_output_dir); echo "== $name: restarting the stopped run in $out"
    fi
  fi
  local config="$WORK_DIR/configs/$name.yaml"
  mkdir -p "$WORK_DIR/configs"
  sed "s#runs/demo#$WORK_DIR#g" "examples/demo/$name.yaml" > "$config"
  echo "== $name: bash launch/$name.sh $config --bf16 $BF16 $* ${extra[*]}"
  local t0; t0=$(date +%s)
  bash "launch/$name.sh" "$config" --bf16 "$BF16" "$@" "${extra[@]}"
  touch "$out/.pipeline_complete"
  echo "== $name: done in $(( $(date +%s) - t0 )) s"
}

# A checkpoint-N folder means the HF stages can continue; without one they restart.
checkpoint_or_restart() { compgen -G "$WORK_DIR/$1/checkpoint-*" >/dev/null && echo --resume_from_checkpoint last; }

wants pt && run_stage pt $(checkpoint_or_restart pt) -- --model_name_or_path "$WORK_DIR/embedded/model" \
  --dataset_dir "$DATA" "${REDUCED_TRAIN[@]}"
wants sft && run_stage sft $(checkpoint_or_restart sft) -- --dataset_dir "$DATA" "${REDUCED_TRAIN[@]}"
wants rm && run_stage rm $(checkpoint_or_restart rm) -- --dataset_dir "$DATA" "${REDUCED_TRAIN[@]}"
wants ppo && run_stage ppo $(checkpoint_or_restart ppo) -- --dataset_dir "$DATA" "${REDUCED_TRAIN[@]}"
if wants export && ! is_complete sft_merged; then
  # DyPRAG's frozen base: pt's model with sft's adapter merged (one plain model folder).
  echo "== export: python -m stages.export --model_name_or_path $WORK_DIR/pt --adapter_name_or_path $WORK_DIR/sft"
  rm -rf "$BASE"
  python -m stages.export --model_name_or_path "$WORK_DIR/pt" --adapter_name_or_path "$WORK_DIR/sft" \
    --export_dir "$BASE"
  touch "$BASE/.pipeline_complete"
fi
wants augment && run_stage augment -- "${REDUCED_RECORDS[@]}"
wants encode && run_stage encode --resume -- "${REDUCED_RECORDS[@]}"
wants projector && run_stage projector $(checkpoint_or_restart projector) -- "${REDUCED_TRAIN[@]}"
wants prag_eval && run_stage prag_eval -- "${REDUCED_RECORDS[@]}"
if wants report; then
  echo "== report: python -m stages.report --pipeline_dir $WORK_DIR --output $WORK_DIR/report.md"
  python -m stages.report --pipeline_dir "$WORK_DIR" --output "$WORK_DIR/report.md"
fi

echo "== main job done in $(( $(date +%s) - start )) s; outputs under $WORK_DIR, report $WORK_DIR/report.md"
