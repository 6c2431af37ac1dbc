"""Bad input of every stage: one line `error: ...` naming the flag or file, exit status 2, no traceback.

Every case runs a stage's entry point as `python -m stages.<stage> ...` does (`runpy`, as
`__main__`) in a process of its own. That process is forked from a Python that has already
imported what every stage imports before it reads its arguments (transformers' TrainingArguments:
~10 s of CPU, most of a failing case's cost); that import must print nothing, which is checked
once. The cases are independent, so the selected ones run side by side (one per core) when the
first test asks; each test then checks its own outcome. A case changes one thing in an otherwise
valid command, and its message must name that thing, so a case cannot pass on another error.
The trained artifacts a command needs (an rm output, a LoRA bank, a projector) are the
cheapest stand-ins that pass the stage's checks, written in process by the fixture.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import ROOT, run_stage, stage_env

ZERO0, ZERO3 = ROOT / "ds_configs" / "zero0.json", ROOT / "ds_configs" / "zero3.json"


@dataclass(frozen=True)
class Case:
    stage: str
    args: Callable[[dict[str, Path]], list[str]]  # paths of the `env` fixture -> argv
    names: Callable[[dict[str, Path]], list[str]]  # what the message must contain (flag, file, line)
    args_only: bool = True  # fails at argument validation: nothing else on stderr before it


def base(env: dict[str, Path], out: str | Path, dataset: str = "demo_sft", model: Path | None = None) -> list[str]:
    """A valid pt/sft/rm command line; `out`: a folder name under env["out"] or a path."""
    return ["--model_name_or_path", model or env["model"], "--dataset", dataset, "--dataset_dir", env["data"],
            "--output_dir", env["out"] / out, "--do_train", "--max_steps", "1", "--report_to", "none"]


def ppo(env: dict[str, Path], out: str | Path, dataset: str = "demo_sft", reward_model: Path | None = None,
        model: Path | None = None) -> list[str]:
    return ["--model_name_or_path", model or env["model"], "--reward_model", reward_model or env["rm"], "--dataset",
            dataset, "--dataset_dir", env["data"], "--output_dir", env["out"] / out, "--max_steps", "1",
            "--report_to", "none"]


def prag(env: dict[str, Path], out: str | Path, records: Path | None = None, flag: str = "--data_file",
         model: Path | None = None) -> list[str]:
    """A valid augment/encode (flag --input_file) or projector/prag_eval (--data_file) command line."""
    return ["--model_name_or_path", model or env["model"], flag, records or env["records"], "--max_samples", "2",
            "--output_dir", env["out"] / out, "--report_to", "none"]


def export(env: dict[str, Path], out: str | Path, projector_dir: Path | None = None) -> list[str]:
    return ["--projector_dir", projector_dir or env["projector"], "--passage", "Kreilshom is a city.",
            "--output_dir", env["out"] / out]


# The rows of the bad-input matrix, by stage; each applicable row has a case below, and a row that cannot happen in
# a stage is absent (ZeRO-3 generation in pt/sft/rm, LoRA flags where nothing trains a LoRA from them, a model
# folder in retrieve, an output_dir in ppo's reward model, ...):
#   pt               missing / not UTF-8 config file; malformed JSON lines (the line); missing column; no model /
#                    not a causal LM; text shorter than one --cutoff_len block (every block dropped); 8-bit + ZeRO-3,
#                    quantization + full tuning, LoRA rank < 0; output_dir holding a run; truncated checkpoint
#   sft              unknown dataset; missing / not UTF-8 data file; malformed JSON (the line); missing column; no
#                    usable rows; unknown flag or config key; malformed DeepSpeed config; quantization + full
#                    tuning, 8-bit + ZeRO-3, LoRA rank 0, fp16 under ZeRO-0, fp16 under DeepSpeed without a GPU;
#                    an --optim whose package is not installed; not a causal LM; output_dir holding a run (refused,
#                    or accepted with --overwrite_output_dir / resuming); truncated checkpoint
#   rm               missing data file; malformed JSON; non-pairwise dataset; missing chosen column; 8-bit + ZeRO-3,
#                    quantization + full tuning, LoRA rank 0; not a causal LM; output_dir (refused after the data
#                    is read); truncated checkpoint
#   ppo              missing --reward_model; --reward_model without a value head; pairwise dataset; adapter of
#                    another base; 8-bit + ZeRO-3, quantization + full tuning, LoRA rank 0; not a causal LM;
#                    output_dir holding a run; truncated checkpoint
#   augment          missing / not UTF-8 / malformed (JSON lines) --input_file; records without a question; no
#                    records; ZeRO-3 (generation); not a causal LM; output_dir holding files
#   retrieve         missing / not UTF-8 / malformed / text-less / empty corpus; malformed --input_file; not an
#                    index; index_dir or output_file that exists
#   encode           missing / malformed (JSON list) --input_file; no passages; LoRA rank 0; ZeRO-3; not a causal
#                    LM; output_dir holding a bank; truncated shard on --resume_from_checkpoint
#   projector        missing --data_file; no / not a --bank_dir; no record in --split; every pair longer than
#                    --cutoff_len (dropped); 8-bit under ZeRO-3; not a causal LM; output_dir holding a run; corrupt
#                    bank shard (sha256); truncated checkpoint
#   prag_eval        missing / not UTF-8 / answer-less --data_file; no record in --split; --bank_dir that is not a
#                    folder; ZeRO-3 (generation); not a causal LM; output_dir holding files; corrupt bank shard;
#                    truncated projector; --fewshot_file that is not JSON
#   projector_export not a projector; truncated projector; missing / malformed --passages_file (the line); not a
#                    causal LM; output_dir holding an adapter
# Longer than --cutoff_len but cut, not dropped (no error; the log counts them): sft and rm conversations, ppo
# prompts, encode texts.
CASES: dict[str, Case] = {
    # ------------------------------------------------------------------ pt
    "missing_config_file": Case(
        "pt", lambda e: [e["data"] / "no_such.yaml", *base(e, "missing_config_file", "demo_pt")],
        lambda e: [str(e["data"] / "no_such.yaml")]),
    "config_file_not_utf8": Case(
        "pt", lambda e: [e["config_not_utf8"], *base(e, "config_file_not_utf8", "demo_pt")],
        lambda e: [str(e["config_not_utf8"]), "could not be parsed"]),
    "malformed_json_lines": Case(
        "pt", lambda e: base(e, "malformed_json_lines", "broken_lines"),
        lambda e: [str(e["data"] / "broken_lines.jsonl"), "line 3"], args_only=False),
    "pt_missing_column": Case(
        "pt", lambda e: base(e, "pt_missing_column", "pt_no_column"),
        lambda e: ["'pt_no_column'", "body", "columns"], args_only=False),
    "model_dir_not_a_model": Case(
        "pt", lambda e: base(e, "model_dir_not_a_model", "demo_pt", model=e["not_a_model"]),
        lambda e: ["--model_name_or_path", str(e["not_a_model"])]),
    "model_dir_not_a_causal_lm": Case(
        "pt", lambda e: base(e, "model_dir_not_a_causal_lm", "demo_pt", model=e["t5"]),
        lambda e: ["--model_name_or_path", str(e["t5"]), "t5", "not a causal LM"]),
    "text_shorter_than_one_block": Case(
        "pt", lambda e: [*base(e, "text_shorter_than_one_block", "demo_pt"), "--cutoff_len", "100000"],
        lambda e: ["--dataset demo_pt", "no usable rows", "--cutoff_len 100000"], args_only=False),
    "pt_8bit_under_zero3": Case(
        "pt", lambda e: [*base(e, "pt_8bit_under_zero3", "demo_pt"), "--quantization_bit", "8", "--deepspeed", ZERO3],
        lambda e: ["--quantization_bit", "ZeRO-3"]),
    "pt_quantization_with_full": Case(
        "pt", lambda e: [*base(e, "pt_quantization_with_full", "demo_pt"), "--quantization_bit", "4",
                         "--finetuning_type", "full"],
        lambda e: ["--quantization_bit", "--finetuning_type"]),
    "pt_lora_rank_negative": Case(
        "pt", lambda e: [*base(e, "pt_lora_rank_negative", "demo_pt"), "--lora_rank", "-2"],
        lambda e: ["--lora_rank", "-2"]),
    "pt_output_dir_holds_a_run": Case(
        "pt", lambda e: base(e, e["run"], "demo_pt"),
        lambda e: ["--output_dir", str(e["run"]), "--overwrite_output_dir"]),
    "corrupt_checkpoint": Case(
        "pt", lambda e: [*base(e, e["run_with_corrupt_checkpoint"], "demo_pt"), "--resume_from_checkpoint", "last"],
        lambda e: ["--resume_from_checkpoint", str(e["corrupt_checkpoint"] / "adapter_model.safetensors")]),
    # ------------------------------------------------------------------ sft (and the issue-2 cases)
    "unknown_dataset": Case(
        "sft", lambda e: base(e, "unknown_dataset", "no_such_set"),
        lambda e: ["'no_such_set'", "--dataset", "dataset_info.json"]),
    "missing_data_file": Case(
        "sft", lambda e: base(e, "missing_data_file", "gone"),
        lambda e: [str(e["data"] / "not_there.json")]),
    "not_utf8": Case(
        "sft", lambda e: base(e, "not_utf8", "not_utf8"),
        lambda e: [str(e["data"] / "not_utf8.json"), "UTF-8"], args_only=False),
    "malformed_json": Case(
        "sft", lambda e: base(e, "malformed_json", "broken"),
        lambda e: [str(e["data"] / "broken.json"), "line 3"], args_only=False),
    "missing_column": Case(
        "sft", lambda e: base(e, "missing_column", "no_column"),
        lambda e: ["'no_column'", "question", "columns"], args_only=False),
    "no_usable_rows": Case(
        "sft", lambda e: base(e, "no_usable_rows", "unanswered"),
        lambda e: ["--dataset unanswered", "no usable rows", "--cutoff_len"], args_only=False),
    "unknown_flag": Case(
        "sft", lambda e: [*base(e, "unknown_flag"), "--lora_rnak", "4"],
        lambda e: ["--lora_rnak"]),
    "unknown_key_in_config": Case(
        "sft", lambda e: [e["bad_config"], *base(e, "unknown_key_in_config")],
        lambda e: ["lora_rnak", str(e["bad_config"])]),
    "malformed_deepspeed_config": Case(
        "sft", lambda e: [*base(e, "malformed_deepspeed_config"), "--deepspeed", e["bad_ds_config"]],
        lambda e: ["--deepspeed", str(e["bad_ds_config"]), "zero_optimization.stage"]),
    "quantization_with_full": Case(
        "sft", lambda e: [*base(e, "quantization_with_full"), "--quantization_bit", "4", "--finetuning_type", "full"],
        lambda e: ["--quantization_bit", "--finetuning_type"]),
    "8bit_under_zero3": Case(
        "sft", lambda e: [*base(e, "8bit_under_zero3"), "--quantization_bit", "8", "--deepspeed", ZERO3],
        lambda e: ["--quantization_bit", "ZeRO-3"]),
    "optim_package_missing": Case(  # refused before the model loads, not by the Trainer's ImportError
        "sft", lambda e: [*base(e, "optim_package_missing"), "--optim", "lomo"],
        lambda e: ["--optim lomo", "lomo_optim"]),
    "lora_rank_zero": Case(
        "sft", lambda e: [*base(e, "lora_rank_zero"), "--lora_rank", "0"],
        lambda e: ["--lora_rank"]),
    "sft_not_a_causal_lm": Case(
        "sft", lambda e: base(e, "sft_not_a_causal_lm", model=e["t5"]),
        lambda e: ["--model_name_or_path", str(e["t5"]), "not a causal LM"]),
    "output_dir_holds_a_run": Case(
        "sft", lambda e: base(e, e["run"]),
        lambda e: ["--output_dir", str(e["run"]), "--overwrite_output_dir", "--resume_from_checkpoint"]),
    # Accepted with --overwrite_output_dir / when resuming: those runs get past the output_dir
    # check and stop at the next mistake planted in them (a missing column, found at data loading).
    "output_dir_overwrite_accepted": Case(
        "sft", lambda e: [*base(e, e["run_to_overwrite"], "no_column"), "--overwrite_output_dir"],
        lambda e: ["'no_column'", "question"], args_only=False),
    "output_dir_resume_accepted": Case(
        "sft", lambda e: [*base(e, e["run_to_resume"], "no_column"), "--resume_from_checkpoint", "last"],
        lambda e: ["'no_column'", "question"], args_only=False),
    "sft_corrupt_checkpoint": Case(
        "sft", lambda e: [*base(e, "sft_corrupt_checkpoint"), "--resume_from_checkpoint", e["corrupt_checkpoint"]],
        lambda e: ["--resume_from_checkpoint", str(e["corrupt_checkpoint"] / "adapter_model.safetensors")]),
    # ------------------------------------------------------------------ rm
    "rm_missing_data_file": Case(
        "rm", lambda e: base(e, "rm_missing_data_file", "gone"),
        lambda e: [str(e["data"] / "not_there.json")]),
    "rm_malformed_json": Case(
        "rm", lambda e: base(e, "rm_malformed_json", "pref_broken"),
        lambda e: [str(e["data"] / "broken.json"), "line 3"], args_only=False),
    "rm_non_pairwise_dataset": Case(
        "rm", lambda e: base(e, "rm_non_pairwise_dataset", "demo_sft"),
        lambda e: ["dataset 'demo_sft' is not pairwise", "--dataset"], args_only=False),
    "rm_missing_column": Case(
        "rm", lambda e: base(e, "rm_missing_column", "pref_no_column"),
        lambda e: ["'pref_no_column'", "better", "columns"], args_only=False),
    "rm_8bit_under_zero3": Case(
        "rm", lambda e: [*base(e, "rm_8bit_under_zero3", "demo_pref"), "--quantization_bit", "8", "--deepspeed", ZERO3],
        lambda e: ["--quantization_bit", "ZeRO-3"]),
    "rm_quantization_with_full": Case(
        "rm", lambda e: [*base(e, "rm_quantization_with_full", "demo_pref"), "--quantization_bit", "4",
                         "--finetuning_type", "full"],
        lambda e: ["--quantization_bit", "--finetuning_type"]),
    "rm_lora_rank_zero": Case(
        "rm", lambda e: [*base(e, "rm_lora_rank_zero", "demo_pref"), "--lora_rank", "0"],
        lambda e: ["--lora_rank"]),
    "rm_not_a_causal_lm": Case(
        "rm", lambda e: base(e, "rm_not_a_causal_lm", "demo_pref", model=e["t5"]),
        lambda e: ["--model_name_or_path", str(e["t5"]), "not a causal LM"]),
    "rm_output_dir_holds_a_run": Case(  # rm reads its data first: the refusal comes after it
        "rm", lambda e: base(e, e["run"], "demo_pref"),
        lambda e: ["--output_dir", str(e["run"]), "--overwrite_output_dir"], args_only=False),
    "rm_corrupt_checkpoint": Case(
        "rm", lambda e: [*base(e, "rm_corrupt_checkpoint", "demo_pref"), "--resume_from_checkpoint",
                         e["corrupt_checkpoint"]],
        lambda e: ["--resume_from_checkpoint", str(e["corrupt_checkpoint"] / "adapter_model.safetensors")],
        args_only=False),
    # ------------------------------------------------------------------ ppo
    "ppo_missing_reward_model": Case(
        "ppo", lambda e: ppo(e, "ppo_missing_reward_model", reward_model=e["data"] / "no_rm"),
        lambda e: ["--reward_model", str(e["data"] / "no_rm"), "rm output"]),
    "ppo_reward_model_without_value_head": Case(  # a causal LM (an sft output), not an rm output
        "ppo", lambda e: ppo(e, "ppo_reward_model_without_value_head", reward_model=e["model"]),
        lambda e: [f"--reward_model {e['model']} holds no value head", "stages.rm"]),
    "ppo_pairwise_dataset": Case(
        "ppo", lambda e: ppo(e, "ppo_pairwise_dataset", "demo_pref"),
        lambda e: ["dataset 'demo_pref' is pairwise", "non-pairwise", "--dataset"], args_only=False),
    "ppo_adapter_of_another_base": Case(
        "ppo", lambda e: [*ppo(e, "ppo_adapter_of_another_base"), "--adapter_name_or_path", e["other_sft"]],
        lambda e: [f"adapter {e['other_sft']} does not fit this base model (it was trained on {e['other_base']})",
                   "--model_name_or_path"], args_only=False),
    "ppo_8bit_under_zero3": Case(
        "ppo", lambda e: [*ppo(e, "ppo_8bit_under_zero3"), "--quantization_bit", "8", "--deepspeed", ZERO3],
        lambda e: ["--quantization_bit", "ZeRO-3"]),
    "ppo_quantization_with_full": Case(
        "ppo", lambda e: [*ppo(e, "ppo_quantization_with_full"), "--quantization_bit", "4", "--finetuning_type",
                          "full"],
        lambda e: ["--quantization_bit", "--finetuning_type"]),
    "ppo_lora_rank_zero": Case(
        "ppo", lambda e: [*ppo(e, "ppo_lora_rank_zero"), "--lora_rank", "0"],
        lambda e: ["--lora_rank"]),
    "ppo_optimizer_state_not_per_element": Case(  # its checkpoints could not hold Adafactor's factored state
        "ppo", lambda e: [*ppo(e, "ppo_optimizer_state_not_per_element"), "--optim", "adafactor"],
        lambda e: ["--optim adafactor", "exp_avg_sq_row", "adamw_torch"]),
    "ppo_not_a_causal_lm": Case(
        "ppo", lambda e: ppo(e, "ppo_not_a_causal_lm", model=e["t5"]),
        lambda e: ["--model_name_or_path", str(e["t5"]), "not a causal LM"]),
    "ppo_output_dir_holds_a_run": Case(
        "ppo", lambda e: ppo(e, e["run"]),
        lambda e: ["--output_dir", str(e["run"]), "--overwrite_output_dir"], args_only=False),
    "ppo_corrupt_checkpoint": Case(
        "ppo", lambda e: [*ppo(e, "ppo_corrupt_checkpoint"), "--resume_from_checkpoint", e["corrupt_checkpoint"]],
        lambda e: ["--resume_from_checkpoint", str(e["corrupt_checkpoint"] / "adapter_model.safetensors")],
        args_only=False),
    # ------------------------------------------------------------------ augment
    "augment_missing_input_file": Case(
        "augment", lambda e: prag(e, "augment_missing_input_file", e["data"] / "missing.json", "--input_file"),
        lambda e: ["--input_file", str(e["data"] / "missing.json"), "does not exist"]),
    "augment_input_not_utf8": Case(
        "augment", lambda e: prag(e, "augment_input_not_utf8", e["records_not_utf8"], "--input_file"),
        lambda e: ["--input_file", str(e["records_not_utf8"]), "UTF-8"]),
    "augment_malformed_json_lines": Case(
        "augment", lambda e: prag(e, "augment_malformed_json_lines", e["records_broken_lines"], "--input_file"),
        lambda e: ["--input_file", str(e["records_broken_lines"]), "line 2"]),
    "augment_records_without_question": Case(
        "augment", lambda e: prag(e, "augment_records_without_question", e["records_no_question"], "--input_file"),
        lambda e: ["--input_file", str(e["records_no_question"]), "'question'"]),
    "augment_no_records": Case(
        "augment", lambda e: prag(e, "augment_no_records", e["records_empty"], "--input_file"),
        lambda e: ["--input_file", str(e["records_empty"]), "no questions"]),
    "augment_zero3": Case(
        "augment", lambda e: [*prag(e, "augment_zero3", flag="--input_file"), "--deepspeed", ZERO3],
        lambda e: ["--deepspeed", "ZeRO-3", "zero2.json"]),
    "augment_not_a_causal_lm": Case(
        "augment", lambda e: prag(e, "augment_not_a_causal_lm", flag="--input_file", model=e["t5"]),
        lambda e: ["--model_name_or_path", str(e["t5"]), "not a causal LM"]),
    "augment_output_dir_holds_files": Case(
        "augment", lambda e: prag(e, e["run"], flag="--input_file"),
        lambda e: ["--output_dir", str(e["run"]), "--overwrite_output_dir"]),
    # ------------------------------------------------------------------ retrieve
    "retrieve_missing_corpus": Case(
        "retrieve", lambda e: ["--corpus", e["data"] / "missing.jsonl", "--index_dir", e["out"] / "index_a"],
        lambda e: [str(e["data"] / "missing.jsonl"), "does not exist"]),
    "retrieve_corpus_not_utf8": Case(
        "retrieve", lambda e: ["--corpus", e["data"] / "corpus_not_utf8.jsonl", "--index_dir", e["out"] / "index_b"],
        lambda e: [str(e["data"] / "corpus_not_utf8.jsonl"), "UTF-8"], args_only=False),
    "retrieve_malformed_corpus_line": Case(
        "retrieve", lambda e: ["--corpus", e["data"] / "corpus_broken.jsonl", "--index_dir", e["out"] / "index_c"],
        lambda e: [str(e["data"] / "corpus_broken.jsonl"), "line 2"], args_only=False),
    "retrieve_corpus_without_text": Case(
        "retrieve", lambda e: ["--corpus", e["data"] / "corpus_no_text.jsonl", "--index_dir", e["out"] / "index_d"],
        lambda e: [str(e["data"] / "corpus_no_text.jsonl"), "line 1", "'text'"], args_only=False),
    "retrieve_empty_corpus": Case(
        "retrieve", lambda e: ["--corpus", e["data"] / "corpus_empty.jsonl", "--index_dir", e["out"] / "index_e"],
        lambda e: [str(e["data"] / "corpus_empty.jsonl"), "no passages"], args_only=False),
    "retrieve_malformed_input_file": Case(
        "retrieve", lambda e: ["--index_dir", e["index"], "--input_file", e["records_broken"], "--output_file",
                               e["out"] / "retrieve_malformed_input_file.json"],
        lambda e: ["--input_file", str(e["records_broken"]), "line 3"]),
    "retrieve_not_an_index": Case(
        "retrieve", lambda e: ["--index_dir", e["data"], "--input_file", e["records"], "--output_file",
                               e["out"] / "retrieve_not_an_index.json"],
        lambda e: [str(e["data"]), "not a complete BM25 index", "--corpus"]),
    "retrieve_index_dir_not_empty": Case(
        "retrieve", lambda e: ["--corpus", e["corpus"], "--index_dir", e["index"]],
        lambda e: ["--index_dir", str(e["index"]), "--overwrite_output_dir"]),
    "retrieve_output_file_exists": Case(
        "retrieve", lambda e: ["--index_dir", e["index"], "--input_file", e["records"], "--output_file",
                               e["retrieved"]],
        lambda e: ["--output_file", str(e["retrieved"]), "--overwrite_output_dir"]),
    # ------------------------------------------------------------------ encode
    "encode_missing_input_file": Case(
        "encode", lambda e: prag(e, "encode_missing_input_file", e["data"] / "missing.json", "--input_file"),
        lambda e: ["--input_file", str(e["data"] / "missing.json"), "does not exist"]),
    "encode_malformed_json": Case(
        "encode", lambda e: prag(e, "encode_malformed_json", e["records_broken"], "--input_file"),
        lambda e: ["--input_file", str(e["records_broken"]), "line 3"]),
    "encode_no_passages": Case(
        "encode", lambda e: prag(e, "encode_no_passages", e["records_no_passages"], "--input_file"),
        lambda e: ["--input_file", str(e["records_no_passages"]), "no passages"]),
    "encode_lora_rank_zero": Case(
        "encode", lambda e: [*prag(e, "encode_lora_rank_zero", flag="--input_file"), "--lora_rank", "0"],
        lambda e: ["--lora_rank"]),
    "encode_zero3": Case(
        "encode", lambda e: [*prag(e, "encode_zero3", flag="--input_file"), "--deepspeed", ZERO3],
        lambda e: ["--deepspeed", "ZeRO-3", "zero2.json"]),
    "encode_not_a_causal_lm": Case(
        "encode", lambda e: prag(e, "encode_not_a_causal_lm", flag="--input_file", model=e["t5"]),
        lambda e: ["--model_name_or_path", str(e["t5"]), "not a causal LM"]),
    "encode_output_dir_holds_a_bank": Case(
        "encode", lambda e: prag(e, e["bank"], flag="--input_file"),
        lambda e: ["--output_dir", str(e["bank"]), "already holds a run", "--resume_from_checkpoint last",
                   "--overwrite_output_dir"]),
    "encode_resume_with_a_truncated_shard": Case(
        "encode", lambda e: [*prag(e, e["bank_to_resume"], flag="--input_file"), "--resume_from_checkpoint", "last"],
        lambda e: ["--resume_from_checkpoint", str(e["bank_to_resume"] / "shard-00000.safetensors"), "truncated"],
        args_only=False),
    # ------------------------------------------------------------------ projector
    "projector_missing_data_file": Case(
        "projector", lambda e: [*prag(e, "projector_missing_data_file", e["data"] / "missing.json"), "--bank_dir",
                                e["bank"]],
        lambda e: ["--data_file", str(e["data"] / "missing.json"), "does not exist"], args_only=False),
    "projector_without_bank_dir": Case(
        "projector", lambda e: prag(e, "projector_without_bank_dir"),
        lambda e: ["--bank_dir is required"]),
    "projector_bank_dir_not_a_bank": Case(
        "projector", lambda e: [*prag(e, "projector_bank_dir_not_a_bank"), "--bank_dir", e["data"]],
        lambda e: ["--bank_dir", str(e["data"]), "index.json is missing"], args_only=False),
    "projector_no_record_in_split": Case(
        "projector", lambda e: [*prag(e, "projector_no_record_in_split"), "--bank_dir", e["bank"], "--split", "dev"],
        lambda e: ["--data_file", "'dev'", "--split"], args_only=False),
    "projector_every_pair_too_long": Case(
        "projector", lambda e: [*prag(e, "projector_every_pair_too_long"), "--bank_dir", e["bank"],
                                "--cutoff_len", "4"],
        lambda e: ["--data_file", "longer than --cutoff_len 4"], args_only=False),
    "projector_8bit_under_zero3": Case(
        "projector", lambda e: [*prag(e, "projector_8bit_under_zero3"), "--bank_dir", e["bank"], "--quantization_bit",
                                "8", "--deepspeed", ZERO3],
        lambda e: ["--quantization_bit", "ZeRO-3"]),
    "projector_not_a_causal_lm": Case(
        "projector", lambda e: [*prag(e, "projector_not_a_causal_lm", model=e["t5"]), "--bank_dir", e["bank"]],
        lambda e: ["--model_name_or_path", str(e["t5"]), "not a causal LM"]),
    "projector_output_dir_holds_a_run": Case(
        "projector", lambda e: [*prag(e, e["run"]), "--bank_dir", e["bank"]],
        lambda e: ["--output_dir", str(e["run"]), "--overwrite_output_dir"]),
    "projector_corrupt_shard": Case(
        "projector", lambda e: [*prag(e, "projector_corrupt_shard"), "--bank_dir", e["bank_corrupt"]],
        lambda e: ["--bank_dir", str(e["bank_corrupt"] / "shard-00000.safetensors"), "sha256"], args_only=False),
    "projector_corrupt_checkpoint": Case(
        "projector", lambda e: [*prag(e, "projector_corrupt_checkpoint"), "--bank_dir", e["bank"],
                                "--resume_from_checkpoint", e["projector_corrupt"]],
        lambda e: ["--resume_from_checkpoint", str(e["projector_corrupt"] / "projector.safetensors")]),
    # ------------------------------------------------------------------ prag_eval
    "prag_eval_missing_data_file": Case(
        "prag_eval", lambda e: [*prag(e, "prag_eval_missing_data_file", e["data"] / "missing.json"), "--bank_dir",
                                e["bank"]],
        lambda e: ["--data_file", str(e["data"] / "missing.json"), "does not exist"]),
    "prag_eval_data_file_not_utf8": Case(
        "prag_eval", lambda e: [*prag(e, "prag_eval_data_file_not_utf8", e["records_not_utf8"]), "--bank_dir",
                                e["bank"]],
        lambda e: ["--data_file", str(e["records_not_utf8"]), "UTF-8"]),
    "prag_eval_records_without_answers": Case(
        "prag_eval", lambda e: [*prag(e, "prag_eval_records_without_answers", e["records_no_answers"]),
                                "--bank_dir", e["bank"]],
        lambda e: ["--data_file", str(e["records_no_answers"]), "gold answers"]),
    "prag_eval_no_record_in_split": Case(
        "prag_eval", lambda e: [*prag(e, "prag_eval_no_record_in_split"), "--bank_dir", e["bank"], "--split", "dev"],
        lambda e: ["--data_file", "'dev'"]),
    "prag_eval_bank_dir_not_a_folder": Case(
        "prag_eval", lambda e: [*prag(e, "prag_eval_bank_dir_not_a_folder"), "--bank_dir", e["data"] / "no_bank"],
        lambda e: ["--bank_dir", str(e["data"] / "no_bank"), "stages.encode"]),
    "prag_eval_fewshot_file_not_json": Case(
        "prag_eval", lambda e: [*prag(e, "prag_eval_fewshot_file_not_json"), "--bank_dir", e["bank"], "--with_cot",
                                "--fewshot_file", e["records_not_utf8"]],
        lambda e: ["--fewshot_file", str(e["records_not_utf8"]), "could not be read as JSON"]),
    "prag_eval_zero3": Case(
        "prag_eval", lambda e: [*prag(e, "prag_eval_zero3"), "--bank_dir", e["bank"], "--deepspeed", ZERO3],
        lambda e: ["--deepspeed", "ZeRO-3", "zero2.json"]),
    "prag_eval_not_a_causal_lm": Case(
        "prag_eval", lambda e: [*prag(e, "prag_eval_not_a_causal_lm", model=e["t5"]), "--bank_dir", e["bank"]],
        lambda e: ["--model_name_or_path", str(e["t5"]), "not a causal LM"]),
    "prag_eval_output_dir_holds_files": Case(
        "prag_eval", lambda e: [*prag(e, e["run"]), "--bank_dir", e["bank"]],
        lambda e: ["--output_dir", str(e["run"]), "--overwrite_output_dir"]),
    "prag_eval_corrupt_shard": Case(  # found before any question is answered
        "prag_eval", lambda e: [*prag(e, "prag_eval_corrupt_shard"), "--bank_dir", e["bank_corrupt"]],
        lambda e: ["--bank_dir", str(e["bank_corrupt"] / "shard-00000.safetensors"), "sha256"]),
    "prag_eval_corrupt_projector": Case(
        "prag_eval", lambda e: [*prag(e, "prag_eval_corrupt_projector"), "--projector_dir", e["projector_corrupt"],
                                "--methods", "dyprag"],
        lambda e: ["--projector_dir", str(e["projector_corrupt"] / "projector.safetensors"), "truncated"],
        args_only=False),
    # ------------------------------------------------------------------ projector_export
    "projector_export_not_a_projector": Case(
        "projector_export", lambda e: export(e, "projector_export_not_a_projector", e["data"]),
        lambda e: ["--projector_dir", str(e["data"]), "projector_config.json"]),
    "projector_export_corrupt_projector": Case(
        "projector_export", lambda e: export(e, "projector_export_corrupt_projector", e["projector_corrupt"]),
        lambda e: ["--projector_dir", str(e["projector_corrupt"] / "projector.safetensors"), "truncated"]),
    "projector_export_missing_passages_file": Case(
        "projector_export", lambda e: ["--projector_dir", e["projector"], "--passages_file",
                                       e["data"] / "missing.json", "--output_dir",
                                       e["out"] / "projector_export_missing_passages_file"],
        lambda e: ["--passages_file", str(e["data"] / "missing.json")]),
    "projector_export_malformed_passages_file": Case(
        "projector_export", lambda e: ["--projector_dir", e["projector"], "--passages_file", e["passages_broken"],
                                       "--output_dir", e["out"] / "projector_export_malformed_passages_file"],
        lambda e: ["--passages_file", str(e["passages_broken"]), "line 2"]),
    "projector_export_not_a_causal_lm": Case(
        "projector_export", lambda e: [*export(e, "projector_export_not_a_causal_lm"), "--model_name_or_path",
                                       e["t5"]],
        lambda e: ["--model_name_or_path", str(e["t5"]), "not a causal LM"]),
    "projector_export_output_dir_holds_an_adapter": Case(
        "projector_export", lambda e: export(e, e["run"]),
        lambda e: ["--output_dir", str(e["run"]), "--overwrite_output_dir"]),
    "fp16_under_zero0": Case(  # deepspeed < 0.20 leaves the loss unscaled there: updates 65536x too small
        "sft", lambda e: [*base(e, "fp16_under_zero0"), "--fp16", "true", "--deepspeed", ZERO0],
        lambda e: ["--fp16", "zero0.json", "ZeRO stage 0", "ds_configs/zero2.json", "--bf16 true"]),
}
# DeepSpeed refuses fp16 on CPU ranks whose CPU has no fp16 kernels (it asks oneDNN, as here)
if not torch.accelerator.is_available() and not torch.ops.mkldnn._is_mkldnn_fp16_supported():
    CASES["fp16_under_deepspeed_without_gpu"] = Case(
        "sft", lambda e: [*base(e, "fp16_under_deepspeed_without_gpu"), "--fp16", "true", "--deepspeed", ZERO3],
        lambda e: ["--fp16", "--bf16 true"])


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _records(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records, indent=1))
    return path


def _plant_prag_artifacts(model_dir: Path, records: list[dict], paths: dict[str, Path]) -> None:
    """An rm output, an sft adapter of another base, a LoRA bank and a projector (each intact and corrupt)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from dyprag.bank import LoraBankWriter
    from dyprag.passage_training import init_lora
    from dyprag.lora import LoraSpec
    from dyprag.projector_model import Projector, ProjectorConfig, save_projector

    # ppo: a full rm output (an untrained value head is enough to pass the checks), an adapter of another base
    AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1).save_pretrained(paths["rm"])
    config = AutoConfig.from_pretrained(model_dir)
    config.hidden_size, config.intermediate_size = 32, 64
    AutoModelForCausalLM.from_config(config).save_pretrained(paths["other_base"])
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    get_peft_model(AutoModelForCausalLM.from_pretrained(paths["other_base"]), lora).save_pretrained(paths["other_sft"])
    # The bank of the first two records' passages (two shards), its projector; copies made corrupt.
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    spec = LoraSpec()
    init = init_lora(model, spec)
    with LoraBankWriter(paths["bank"], spec, str(model_dir), shard_size=3) as writer:
        for record in records[:2]:
            for pid in range(len(record["passages"])):
                writer.add(f"{record['test_id']}_{pid}", init)
    for name in ("bank_corrupt", "bank_to_resume"):
        shutil.copytree(paths["bank"], paths[name])
    shard = paths["bank_corrupt"] / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # one flipped bit: the size is right, the sha256 is not
    shard.write_bytes(bytes(data))
    shard = paths["bank_to_resume"] / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    projector = Projector(ProjectorConfig.for_model(model, spec, base_model_name_or_path=str(model_dir)))
    for name in ("projector", "projector_corrupt"):
        save_projector(projector, paths[name])
    weights = paths["projector_corrupt"] / "projector.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model, demo_data) -> dict[str, Path]:
    """A registry and files with planted mistakes, runs that already exist, non-models, stage artifacts."""
    root = tmp_path_factory.mktemp("user_errors")
    data = root / "data"
    data.mkdir()
    info = json.loads((demo_data / "dataset_info.json").read_text())
    for entry in info.values():
        entry["file_name"] = str(demo_data / entry["file_name"])
    # Line 3 misses a comma (tests/test_data.py covers the other layouts in process).
    (data / "broken.json").write_text('[\n{"instruction": "a", "output": "b"},\n'
                                      '{"instruction": "c" "output": "d"}\n]\n')
    (data / "broken_lines.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c\n')
    (data / "not_utf8.json").write_bytes(b"\x1f\x8b\x08\x00\xff\xfe compressed, not JSON text")
    (data / "unanswered.json").write_text(json.dumps([{"instruction": f"Question {i}?"} for i in range(4)]))
    info.update({
        "gone": {"file_name": "not_there.json"},
        "no_column": {"file_name": str(demo_data / "demo_sft.json"), "columns": {"prompt": "question"}},
        "broken": {"file_name": "broken.json"},
        "broken_lines": {"file_name": "broken_lines.jsonl", "columns": {"prompt": "text"}},
        "not_utf8": {"file_name": "not_utf8.json"},
        "unanswered": {"file_name": "unanswered.json"},
        "pt_no_column": {**info["demo_pt"], "columns": {"prompt": "body"}},
        "pref_broken": {**info["demo_pref"], "file_name": "broken.json"},
        "pref_no_column": {**info["demo_pref"], "columns": {**info["demo_pref"]["columns"], "chosen": "better"}},
    })
    (data / "dataset_info.json").write_text(json.dumps(info, indent=2))
    (root / "bad.yaml").write_text("finetuning_type: lora\nlora_rnak: 4\n")
    (root / "bad_ds.json").write_text('{"zero_optimization": {"stage": "three"}}')
    (root / "not_utf8.yaml").write_bytes(b"learning_rate: 1e-4\n# caf\xe9\n")
    # PRAG records, corpora and passages with planted mistakes
    records = json.loads((demo_data / "demo_qa.json").read_text())
    (data / "records_broken.jsonl").write_text(json.dumps(records[0]) + "\n" + json.dumps(records[1])[:-9] + "\n")
    (data / "records_broken.json").write_text(  # line 3 lacks a colon
        "[\n" + json.dumps(records[0]) + ",\n" + json.dumps(records[1]).replace('"question":', '"question"') + "\n]\n")
    (data / "records_empty.json").write_text("[]\n")
    (data / "records_not_utf8.json").write_bytes(b"[{\"question\": \"caf\xe9?\"}]")
    (data / "corpus_broken.jsonl").write_text('{"id": "1", "text": "a"}\n{"id": "2", "text": \n')
    (data / "corpus_no_text.jsonl").write_text('{"id": "1", "body": "a"}\n')
    (data / "corpus_not_utf8.jsonl").write_bytes(b'{"id": "1", "text": "caf\xe9"}\n')
    (data / "corpus_empty.jsonl").write_text("\n")
    (data / "passages_broken.json").write_text('[\n"one passage" "another"\n]\n')
    not_a_model, t5 = root / "not_a_model", root / "t5"
    not_a_model.mkdir()
    (not_a_model / "notes.txt").write_text("my notes, not a model\n")
    t5.mkdir()
    (t5 / "config.json").write_text(json.dumps({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]}))
    paths = {"model": tiny_model, "data": data, "out": root / "out", "bad_config": root / "bad.yaml",
             "bad_ds_config": root / "bad_ds.json", "config_not_utf8": root / "not_utf8.yaml",
             "not_a_model": not_a_model, "t5": t5, "records": demo_data / "demo_qa.json",
             "corpus": demo_data / "demo_corpus.jsonl",
             "records_broken": data / "records_broken.json", "records_broken_lines": data / "records_broken.jsonl",
             "records_empty": data / "records_empty.json", "records_not_utf8": data / "records_not_utf8.json",
             "passages_broken": data / "passages_broken.json",
             "records_no_question": _records(data / "records_no_question.json",
                                             [{"query": r["question"]} for r in records[:2]]),
             "records_no_passages": _records(data / "records_no_passages.json",
                                             [{**r, "passages": []} for r in records[:2]]),
             "records_no_answers": _records(data / "records_no_answers.json",
                                            [{**r, "answer": []} for r in records[:2]]),
             **{name: root / name for name in ("rm", "other_base", "other_sft", "bank", "bank_corrupt",
                                               "bank_to_resume", "projector", "projector_corrupt")}}
    # An earlier attempt of the malformed_json command stopped at its data error and left only its
    # run_config.json: that is not a run, so the same command runs again (and stops at the data).
    (paths["out"] / "malformed_json").mkdir(parents=True)
    (paths["out"] / "malformed_json" / "run_config.json").write_text('{"stage": "sft"}')
    for name in ("run", "run_to_overwrite", "run_to_resume", "run_with_corrupt_checkpoint"):  # someone's runs
        run = root / name
        (run / "checkpoint-1").mkdir(parents=True)
        (run / "adapter_model.safetensors").write_bytes(b"weights the user trained")
        (run / "adapter_config.json").write_text('{"r": 8}')
        (run / "checkpoint-1" / "trainer_state.json").write_text('{"global_step": 1}')
        (run / "notes.txt").write_text("keep me\n")
        paths[name] = run
    _plant_prag_artifacts(tiny_model, records, paths)
    # The last checkpoint of that run was cut short by a full disk: its weights end early.
    last = paths["corrupt_checkpoint"] = paths["run_with_corrupt_checkpoint"] / "checkpoint-2"
    last.mkdir()
    (last / "trainer_state.json").write_text('{"global_step": 2}')
    (last / "adapter_model.safetensors").write_bytes((paths["bank"] / "shard-00001.safetensors").read_bytes()[:100])
    from dyprag.retrieval import BM25Index

    paths["index"], paths["retrieved"] = root / "index", root / "retrieved.json"
    BM25Index.from_corpus_file(paths["corpus"], show_progress=False).save(paths["index"])
    paths["retrieved"].write_text("[]\n")
    return paths


# Cases whose refusal must leave the user's folders as they were (test_refused_runs_leave_the_users_files_untouched)
# and the folders they point at.
UNTOUCHED = {"output_dir_holds_a_run": "run", "pt_output_dir_holds_a_run": "run", "rm_output_dir_holds_a_run": "run",
             "ppo_output_dir_holds_a_run": "run", "augment_output_dir_holds_files": "run",
             "projector_output_dir_holds_a_run": "run", "prag_eval_output_dir_holds_files": "run",
             "projector_export_output_dir_holds_an_adapter": "run", "model_dir_not_a_model": "not_a_model",
             "corrupt_checkpoint": "run_with_corrupt_checkpoint", "encode_output_dir_holds_a_bank": "bank",
             "retrieve_index_dir_not_empty": "index", "retrieve_output_file_exists": "retrieved"}
FILE_CASES = (*UNTOUCHED, "output_dir_overwrite_accepted", "output_dir_resume_accepted", "rm_non_pairwise_dataset")


# A Python that imports what every stage imports first, under main_guard as a stage's `main` does, then
# runs each command it reads (stage, argv, stdout and stderr files) in a fork, as `python -m` would, and
# answers its exit status. One command at a time: a worker thread owns one such process.
WARM_STAGES = """
import json, os, runpy, signal, sys, traceback
from stages.core.errors import main_guard

main_guard(lambda argv: __import__("transformers.training_args"))([])
print("ready", flush=True)
for line in sys.stdin:
    stage, argv, stdout, stderr = json.loads(line)
    pid = os.fork()
    if pid == 0:
        for fd, path, mode in ((0, os.devnull, os.O_RDONLY), (1, stdout, os.O_WRONLY | os.O_CREAT),
                               (2, stderr, os.O_WRONLY | os.O_CREAT)):
            os.dup2(os.open(path, mode), fd)
        sys.argv = ["-m", *argv]  # runpy puts the module's path first, as python -m does
        signal.alarm(300)  # a case that hangs fails (killed by SIGALRM) instead of blocking the others
        try:
            runpy.run_module(f"stages.{stage}", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as stop:  # sys.exit(message) prints it and exits 1, as the interpreter does
            code = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
            if stop.code is not None and not isinstance(stop.code, int):
                print(stop.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


class WarmStages:
    """One warm process (see WARM_STAGES); `run` executes one stage command in a fork of it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True)
        with open(folder / "warm_up.err", "w") as stderr:
            self.process = subprocess.Popen([sys.executable, "-c", WARM_STAGES], cwd=ROOT, env=stage_env(),
                                            text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr)

    def ready(self) -> None:
        """Wait for the imports; they must print nothing (every stage's stderr would start with it)."""
        assert self.process.stdout.readline() == "ready\n", (self.folder / "warm_up.err").read_text()[-3000:]
        assert (self.folder / "warm_up.err").read_text() == ""

    def run(self, name: str, stage: str, args: list) -> subprocess.CompletedProcess:
        stdout, stderr = self.folder / f"{name}.out", self.folder / f"{name}.err"
        self.process.stdin.write(json.dumps([stage, [str(a) for a in args], str(stdout), str(stderr)]) + "\n")
        self.process.stdin.flush()
        code = int(self.process.stdout.readline())
        return subprocess.CompletedProcess(["python", "-m", f"stages.{stage}", *map(str, args)], code,
                                           stdout.read_text(), stderr.read_text())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def outcomes(request, env, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Run the selected cases once, side by side (one per core); each test reads its own outcome."""
    selected = set()
    for item in request.session.items:  # `-k one_case` starts one process, not all of them
        if item.originalname == test_user_error_is_one_line_naming_the_fix.__name__:
            selected.add(item.callspec.params["name"])
        elif item.originalname == test_refused_runs_leave_the_users_files_untouched.__name__:
            selected.update(FILE_CASES)
    before = {name: _snapshot(env[name]) if env[name].is_dir() else env[name].read_bytes()
              for name in set(UNTOUCHED.values())}
    names = [name for name in CASES if name in selected]
    logs = tmp_path_factory.mktemp("stage_logs")
    workers = [WarmStages(logs / f"worker{i}") for i in range(min(os.cpu_count() or 2, len(names)))]
    idle: queue.Queue[WarmStages] = queue.Queue()
    try:
        for worker in workers:
            worker.ready()
            idle.put(worker)

        def run(name: str) -> subprocess.CompletedProcess:
            worker = idle.get()
            try:
                return worker.run(name, CASES[name].stage, CASES[name].args(env))
            finally:
                idle.put(worker)

        with ThreadPoolExecutor(max_workers=len(workers)) as pool:
            results = dict(zip(names, pool.map(run, names)))
    finally:
        for worker in workers:
            worker.close()
    return {**results, "_before": before}


@pytest.mark.parametrize("name", list(CASES))
def test_user_error_is_one_line_naming_the_fix(name, env, outcomes):
    result = outcomes[name]
    stderr = result.stderr.strip()
    assert result.returncode == 2, f"exit {result.returncode}\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = stderr.splitlines()
    error_lines = [line for line in lines if line.startswith("error:")]
    assert len(error_lines) == 1 and lines[-1] == error_lines[0], stderr[-3000:]
    if CASES[name].args_only:  # argument validation: before any log line, progress bar or warning
        assert lines == error_lines, stderr[-3000:]
    for needed in CASES[name].names(env):
        assert needed in error_lines[0], f"{needed!r} not named in: {error_lines[0]}"


def test_refused_runs_leave_the_users_files_untouched(env, outcomes):
    for case, name in UNTOUCHED.items():
        assert outcomes[case].returncode == 2, case
        now = _snapshot(env[name]) if env[name].is_dir() else env[name].read_bytes()
        assert now == outcomes["_before"][name], f"{env[name]} was modified"
    # A refused rm run leaves only its run_config.json: the corrected command can use the same folder.
    from stages.core.stage import CONFIG_FILE, prepare_output_dir

    refused = env["out"] / "rm_non_pairwise_dataset"
    assert outcomes["rm_non_pairwise_dataset"].returncode == 2
    assert [path.name for path in refused.iterdir()] == [CONFIG_FILE]
    prepare_output_dir(str(refused), overwrite=False)  # not refused: no run is in the folder
    # The accepted runs were allowed to write (their own config), and kept what the user had.
    for name in ("run_to_overwrite", "run_to_resume"):
        assert (env[name] / "run_config.json").is_file()
        assert (env[name] / "notes.txt").read_text() == "keep me\n"
    resumed = json.loads((env["run_to_resume"] / "run_config.json").read_text())
    assert Path(resumed["resume_from_checkpoint"]) == env["run_to_resume"] / "checkpoint-1"


def test_help_exits_0_without_deepspeed_or_wandb():
    # -X importtime lists every module the process imported, on stderr.
    result = run_stage("sft", "--help", check=False, env=stage_env(PYTHONPROFILEIMPORTTIME="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    for flag in ("--model_name_or_path", "--dataset", "--template", "--packing", "--lora_rank",
                 "--quantization_bit", "--overwrite_output_dir", "--learning_rate", "--deepspeed"):
        assert flag in result.stdout
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert not {m for m in imported if m.split(".")[0] in ("deepspeed", "wandb", "trl")}


@pytest.mark.parametrize("stage", ["sft", "pt"])
def test_importing_a_stage_is_light(stage):
    """Importing the module (calling nothing) pulls in no heavy library; a fresh interpreter each."""
    code = (f"import sys, json, stages.{stage}; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('deepspeed', 'wandb', 'bitsandbytes', 'trl', 'peft'))))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=stage_env(), capture_output=True,
                            text=True, timeout=120, check=True)
    assert json.loads(result.stdout) == []
