"""projector: train DyPRAG's parameter projector on (passage, its PRAG LoRA, a QA text about it).

    python -m stages.projector --model_name_or_path M --data_file records.json --bank_dir BANK --output_dir OUT
    deepspeed launch/projector.sh --model_name_or_path M --data_file records.json --bank_dir BANK --output_dir OUT
    bash launch/projector.sh ...   # the same through the launcher (NPROC_PER_NODE ranks)

Training pairs come from part 1's outputs: the PRAG records (`--data_file`, the file that
`stages.encode` encoded) and their LoRA bank (`--bank_dir`, keys "<test_id>_<pid>"). Every
QA pair of a passage's augmentation (`<model>_qa`) is one pair (`--qa_pairs first`: its first
only); a record without augmentation pairs its own question and first answer with its first
passage (the gold / top-1 one). The QA text is the original prompt + "The answer is <answer>."
(`dyprag.prompts`; `--with_cot`: the chain-of-thought prompt and the QA's full_answer), with the
question alone by default (the prompt DyPRAG answers at test time) or the passage in context
(`--qa_with_passage`). The original's texts are `--qa_pairs first --qa_with_passage true`, with
`--with_cot --fewshot_file F` for 2WikiMultihopQA and HotpotQA.

Per step (`dyprag.projector_model.distillation_losses`): the frozen model reads each passage (last
layer, pooled), the projector turns it into a LoRA, and
    loss = LM(student) + kl_weight * KL(teacher || student) + mse_weight * MSE(generated, real A/B)
where student = model + generated LoRA and teacher = model + the passage's bank LoRA, each
injected per sample (`inject_lora`). `--objective answer` (default): LM and KL are means over
the answer tokens, and both LoRAs are scaled by alpha/r. `--objective original` (train_dyprag.py):
LM is the mean over every token of the text, KL the sum over each text's tokens (its `batchmean`
at batch 1), and the student's LoRA is injected unscaled (B @ A) against the teacher's alpha/r
(the projector is then saved with alpha = r, so it is injected unscaled at inference too).
Padding never counts in either (the original pads every text to 3000 tokens and sums the KL of
the pads too).
The bank rows of all training passages are read into memory once (`--bank_in_memory`).

The projector is the only trainable module and the only one DeepSpeed trains (ZeRO-0/1/2,
"auto" values resolved from the flags before `deepspeed.initialize`); the base model stays
frozen in the compute dtype (--bf16/--fp16), optionally 4/8-bit (`--quantization_bit`), and
with a ZeRO-3 config partitioned across the ranks (loaded so, gathered layer by layer by an
engine of its own without an optimizer; the projector then trains under ZeRO-2). The
projector itself trains in fp32. Without a launcher the run is a world of one (ZeRO-0 unless
--deepspeed names a config).

Output: OUT/projector.safetensors + projector_config.json (load with
`dyprag.projector_model.load_projector`; `stages.prag_eval --projector_dir OUT` evaluates it,
`stages.projector_export` writes generated adapters), run_config.json, trainer_log.jsonl (every
loss term per step; W&B with --report_to wandb), and OUT/checkpoint-<step>/ every
--save_steps and at the end of every epoch: projector weights + config, Adam moments
(safetensors), trainer_state.json (step, scheduler, data position), rng.safetensors.
Checkpoints hold whole tensors (gathered from the ZeRO partitions), so a run resumes on any
number of ranks: --resume_from_checkpoint OUT/checkpoint-N, or `last` for the latest. A
checkpoint is written under OUT/.saving/ and renamed whole, so `last` never takes a
half-written one. The training loop is `stages.core.projector_trainer.ProjectorTrainer`.

A NaN/inf loss on any rank stops the run before that micro-batch's backward pass (every rank
agrees, the checkpoints stay intact); with --nan_policy skip the micro-batch adds no gradient,
counts 0 in the logged losses, and `skipped_batches` in trainer_log.jsonl counts it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from .core.dyprag_arguments import ProjectorArguments
from .core.errors import UserError, main_guard
from .core.projector_trainer import Pair

logger = logging.getLogger(__name__)

STAGE = "projector"


@dataclass
class ProjectorTrainingArguments(TrainingArguments):
    """TrainingArguments with the original DyPRAG defaults (torch AdamW, constant lr, no clipping)."""

    learning_rate: float = field(default=1e-5, metadata={"help": "AdamW learning rate of the projector (the "
                                                                 "original: 1e-5)."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Passes over the training pairs (the original: "
                                                                   "1)."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Pairs per rank and micro-step, padded to "
                                                                          "the longest in the batch (the original: "
                                                                          "1)."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (torch's default, which the "
                                                                "original uses)."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "Learning-rate schedule (transformers "
                                                                         "names; the original: constant)."})
    max_grad_norm: float = field(default=0.0, metadata={"help": "Gradient clipping norm (0: none, as the "
                                                                "original)."})
    logging_steps: float = field(default=1, metadata={"help": "Write the loss terms every N optimizer steps."})


def build_pairs(records: list[dict[str, Any]], augment_name: str | None, tokenizer: Any,
                args: ProjectorArguments, fewshot: str | None = None) -> tuple[list[Pair], int]:
    """The training pairs of the records (see the module docstring) and how many were too long."""
    from dyprag.projector_model import qa_text, tokenize_passages
    from dyprag.records import collect_passages, passage_id

    answer_key = "full_answer" if args.with_cot else "answer"
    pairs, too_long = [], 0
    for record in records:
        first = passage_id(record["test_id"], 0)
        for passage in collect_passages([record], augment_name):
            qas = [(qa["question"], str(qa[answer_key])) for qa in passage.qas
                   if qa.get("question") and qa.get(answer_key)]
            if not qas and passage.id == first and record["answer"] and not args.with_cot:
                qas = [(record["question"], record["answer"][0])]
            if args.qa_pairs == "first":
                qas = qas[:1]
            tokens = tokenize_passages(tokenizer, [passage.text], args.max_passage_length)[0]
            for question, answer in qas:
                text, start = qa_text(tokenizer, question, answer, [passage.text] if args.qa_with_passage else None,
                                      args.with_cot, fewshot)
                if len(text) > args.cutoff_len or start >= len(text):
                    too_long += 1
                    continue
                pairs.append(Pair(passage.id, tokens, text, start))
    return pairs, too_long


def load_pairs(proj_args: ProjectorArguments, tokenizer: Any) -> tuple[list[Pair], Any]:
    """The training pairs whose passage has a bank LoRA, and the bank."""
    from dyprag.bank import LoraBank, LoraBankError
    from dyprag.prompts import read_fewshot
    from dyprag.records import RecordError, detect_augment_model, load_split

    try:
        records = load_split(proj_args.data_file, proj_args.split, proj_args.max_samples)
        has_augment = any(r.get("augment") for r in records)
        augment_name = proj_args.augment_model_name or (detect_augment_model(records) if has_augment else None)
    except RecordError as err:
        raise UserError(f"--data_file: {err}") from None
    try:
        bank = LoraBank(proj_args.bank_dir)
    except LoraBankError as err:
        raise UserError(f"--bank_dir: {err}") from None
    try:
        fewshot = read_fewshot(proj_args.fewshot_file) if proj_args.with_cot else None
    except RecordError as err:
        raise UserError(f"--fewshot_file {err}") from None
    pairs, too_long = build_pairs(records, augment_name, tokenizer, proj_args, fewshot)
    without_lora = sum(1 for p in pairs if p.passage_id not in bank)
    pairs = [p for p in pairs if p.passage_id in bank]
    if not pairs:
        if without_lora:
            reason = (f"no passage of its {without_lora} QA pairs has a LoRA in --bank_dir {proj_args.bank_dir}; "
                      f"encode these records first (python -m stages.encode)")
        elif too_long:
            reason = (f"all {too_long} QA pairs are longer than --cutoff_len {proj_args.cutoff_len} tokens and were "
                      f"dropped; raise --cutoff_len")
        else:
            reason = "its records have no QA pair (augmentation or a question with an answer)"
        raise UserError(f"no training pairs in --data_file {proj_args.data_file}: {reason}.")
    try:  # the teachers' shards are read before any training step: a corrupt one fails now
        bank.check([p.passage_id for p in pairs])
    except LoraBankError as err:
        raise UserError(f"--bank_dir: {err}") from None
    logger.info("%d training pairs (dropped: %d longer than --cutoff_len, %d without a bank LoRA)", len(pairs),
                too_long, without_lora)
    return pairs, bank


def new_projector(model: Any, bank: Any, proj_args: ProjectorArguments, model_args: Any) -> Any:
    """A fresh projector from the model's hidden states to LoRAs of the bank's shape (seed first)."""
    from dyprag.lora import LoraSpec
    from dyprag.projector_model import Projector, ProjectorConfig

    # The original objective injects the student's LoRA unscaled: its spec then has alpha = r, so
    # inference (prag_eval, projector_export) injects it as it was trained.
    spec = bank.spec if proj_args.objective == "answer" else LoraSpec(rank=bank.spec.rank, alpha=bank.spec.rank,
                                                                       target_modules=bank.spec.target_modules)
    try:
        config = ProjectorConfig.for_model(
            model, spec, projector_p=proj_args.projector_p, pooling=proj_args.pooling,
            max_passage_length=proj_args.max_passage_length, base_model_name_or_path=model_args.model_name_or_path)
    except ValueError as err:
        raise UserError(f"--bank_dir {proj_args.bank_dir}: {err}") from None
    if set(config.modules) != set(bank.modules):
        raise UserError(f"--bank_dir {proj_args.bank_dir} holds LoRAs for other modules than this model's "
                        f"{', '.join(bank.spec.target_modules)}; encode with --model_name_or_path "
                        f"{model_args.model_name_or_path}.")
    return Projector(config)


def run_projector(argv: list[str] | None = None) -> None:
    from transformers import set_seed

    from .core.arguments import ModelArguments, RunArguments
    from .core.loader import load_frozen_model, load_tokenizer
    from .core.projector_trainer import ProjectorTrainer
    from .core.stage import start_stage

    # 1. arguments and checks (before anything is loaded); the base model stays frozen
    (model_args, proj_args, training_args, run_args), run = start_stage(
        STAGE, [ModelArguments, ProjectorArguments, ProjectorTrainingArguments, RunArguments], argv, train_only=True,
        checkpoints=True)

    # 2. training pairs and their bank; the frozen model (partitioned across the ranks under ZeRO-3)
    tokenizer = load_tokenizer(model_args)
    pairs, bank = load_pairs(proj_args, tokenizer)
    model = load_frozen_model(tokenizer, model_args, bf16=training_args.bf16, fp16=training_args.fp16,
                              zero3=run.zero3)

    # 3. the projector, seeded: the same on every rank
    set_seed(training_args.seed)
    projector = new_projector(model, bank, proj_args, model_args)

    # 4. train (resuming if asked), checkpoints on the way; the trained projector and its config
    trainer = ProjectorTrainer(projector, model, tokenizer, bank, pairs, proj_args, run)
    run.start_wandb()
    trainer.train()
    trainer.save()


main = main_guard(run_projector)

if __name__ == "__main__":
    main()
