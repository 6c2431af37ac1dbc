#!/usr/bin/env bash
# The main job on the embedded default, every stage through its launch script:
#   the model (SmolLM2-135M-Instruct, converted once per machine) and the synthetic world -> pt -> sft
#   -> rm -> ppo -> export (pt + sft merged: the frozen base of DyPRAG) -> augment -> encode -> projector
#   -> evaluation (vanilla / RAG / PRAG / PRAG-Combine / DyPRAG / DyPRAG-Combine) on the world's held-out
#   questions -> encode_real + prag_eval_real: the same six methods on real PRAG records -> report
# A stage that finished (its output_dir holds .pipeline_complete) is skipped; a half-finished
# one resumes where its stage can (pt/sft/rm from their last checkpoint, encode from its
# finished bank shards, projector from its last checkpoint) and restarts otherwise, so running
# this again continues where it stopped. Re-run one stage alone: delete its folder (or its
# .pipeline_complete) and run this again, or call its launch script with the command printed.
# Settings (environment): WORK_DIR (default runs/demo), NPROC_PER_NODE (ranks, default 2),
# PRESET (smollm2|tiny|bench, default smollm2: the real model with examples/demo/*.yaml; the random
# tiny/bench Llamas take examples/tiny/*.yaml), STAGES (space-separated subset to run, default all),
# MODEL (any Hugging Face causal LM folder with a chat template, in place of the preset's model: the
# world and examples/demo's settings stay), DEMO_SCALE (reduced|full: reduced shortens every stage, for tests), BF16 (true|false, default:
# true where bf16 is native: a GPU, or a CPU with AVX512-BF16/AMX), WANDB_MODE (offline unless an
# account is configured), WANDB_RUN_GROUP (default: the W&B group of the demo).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK_DIR=${WORK_DIR:-runs/demo}
export NPROC_PER_NODE=${NPROC_PER_NODE:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC_PER_NODE > 0 ? $(nproc) / NPROC_PER_NODE : 1 ))}
export TOKENIZERS_PARALLELISM=false
PRESET=${PRESET:-smollm2}
CONFIGS=examples/demo
[ "$PRESET" = smollm2 ] || CONFIGS=examples/tiny
REAL_RECORDS=../shared/data/prag_augmented/complexwebquestions_llama3.2-1b_46.json
STAGES=${STAGES:-"pt sft rm ppo export augment encode projector prag_eval encode_real prag_eval_real report"}
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

python -m stages.world --output_dir "$WORK_DIR/embedded" --preset "$PRESET"

# A stage runs when STAGES names it and the preset's configs have it (the real records: when present).
wants() {
  [[ " $STAGES " == *" $1 "* ]] && { [ "$1" = report ] || [ -f "$CONFIGS/$1.yaml" ]; } || return 1
  if [[ $1 == *_real ]] && [ ! -f "$REAL_RECORDS" ]; then echo "== $1: skipped, $REAL_RECORDS is absent"; return 1; fi
}
config_for() {  # CONFIGS/NAME.yaml with its runs/demo paths under WORK_DIR, and MODEL for the preset's model
  mkdir -p "$WORK_DIR/configs"
  sed -e "s#runs/demo/embedded/model#${MODEL:-runs/demo/embedded/model}#g" -e "s#runs/demo#$WORK_DIR#g" \
    "$CONFIGS/$1.yaml" > "$WORK_DIR/configs/$1.yaml"
  echo "$WORK_DIR/configs/$1.yaml"
}
is_complete() { [ -f "$WORK_DIR/$1/.pipeline_complete" ]; }

# run_stage NAME RESUME_FLAGS... -- OVERRIDES...: launch/STAGE.sh CONFIGS/NAME.yaml (STAGE: NAME without
# its _real suffix) with paths under WORK_DIR; RESUME_FLAGS are added when the output_dir exists (a stopped
# run), --overwrite_output_dir when that stage cannot resume.
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
  local config; config=$(config_for "$name")
  echo "== $name: bash launch/${name%_real}.sh $config --bf16 $BF16 $* ${extra[*]}"
  local t0; t0=$(date +%s)
  bash "launch/${name%_real}.sh" "$config" --bf16 "$BF16" "$@" "${extra[@]}"
  touch "$out/.pipeline_complete"
  echo "== $name: done in $(( $(date +%s) - t0 )) s"
}

# A checkpoint-N folder means the HF stages can continue; without one they restart.
checkpoint_or_restart() { compgen -G "$WORK_DIR/$1/checkpoint-*" >/dev/null && echo --resume_from_checkpoint last; }

wants pt && run_stage pt $(checkpoint_or_restart pt) -- --dataset_dir "$DATA" "${REDUCED_TRAIN[@]}"
wants sft && run_stage sft $(checkpoint_or_restart sft) -- --dataset_dir "$DATA" "${REDUCED_TRAIN[@]}"
wants rm && run_stage rm $(checkpoint_or_restart rm) -- --dataset_dir "$DATA" "${REDUCED_TRAIN[@]}"
wants ppo && run_stage ppo $(checkpoint_or_restart ppo) -- --dataset_dir "$DATA" "${REDUCED_TRAIN[@]}"
if wants export && ! is_complete sft_merged; then
  # DyPRAG's frozen base: the model with sft's (and, for a LoRA pt, pt's) adapter merged: one plain folder.
  config=$(config_for export)
  echo "== export: python -m stages.export $config"
  rm -rf "$BASE"
  python -m stages.export "$config"
  touch "$BASE/.pipeline_complete"
fi
wants augment && run_stage augment -- "${REDUCED_RECORDS[@]}"
wants encode && run_stage encode --resume_from_checkpoint last -- "${REDUCED_RECORDS[@]}"
wants projector && run_stage projector $(checkpoint_or_restart projector) -- "${REDUCED_TRAIN[@]}"
wants prag_eval && run_stage prag_eval -- "${REDUCED_RECORDS[@]}"
wants encode_real && run_stage encode_real --resume_from_checkpoint last -- "${REDUCED_RECORDS[@]}"
wants prag_eval_real && run_stage prag_eval_real -- "${REDUCED_RECORDS[@]}"
if wants report; then
  echo "== report: python -m stages.report --pipeline_dir $WORK_DIR --output $WORK_DIR/report.md"
  python -m stages.report --pipeline_dir "$WORK_DIR" --output "$WORK_DIR/report.md"
fi

echo "== main job done in $(( $(date +%s) - start )) s; outputs under $WORK_DIR, report $WORK_DIR/report.md"
