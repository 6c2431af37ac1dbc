"""encode: PRAG's offline step: one LoRA per passage, trained on its augmented texts, into a LoRA bank.

    python -m stages.encode --model_name_or_path M --input_file augmented.json --output_dir BANK [--key value ...]
    deepspeed launch/encode.sh --model_name_or_path M --input_file augmented.json --output_dir BANK
    bash launch/encode.sh ...   # the same through the launcher (NPROC_PER_NODE ranks)

Input: PRAG records (the public format, e.g. stages.augment's augmented.json); the
augmentation fields `<model>_rewrite` / `<model>_qa` are detected. Each passage (id
"<test_id>_<pid>") gets a rank-r LoRA on the MLP projections of every layer, trained from one
shared initialisation (BANK/init, a peft adapter) with the original recipe (dyprag.passage_training):
its QA texts with the passage / rewrite in context, AdamW lr 3e-4, one text per step, one
epoch. Passages without augmentation train on their own text (counted in the log). A passage
that several records hold with the same augmentation is trained once: its ids share one bank row.

Many passages train at once (`--passages_per_batch`), each with its own parameters and
optimizer state; the frozen model runs in the compute dtype (--bf16 on AMX CPUs and GPUs).
Under the launcher the ranks split the passages (no optimizer to shard: each rank holds the
frozen model) and write their own shards; rank 0 joins the indexes into one bank
(dyprag.bank_encoding). A killed run continues with --resume_from_checkpoint last (finished
shards are kept; a shard is written under a temporary name and renamed whole, so the index never
points at a half-written one). --overwrite_output_dir replaces the bank's own files only.

A passage whose loss becomes NaN/inf stops the run (--nan_policy stop: the passages of the
earlier batches are written to the bank first, --resume_from_checkpoint last continues) or is
left out of the bank (--nan_policy skip: counted in the log and encode_summary.json; a resumed
run tries it again). The other passages of its batch train exactly as they would without it.

Output: BANK/index.json + shard-*.safetensors (dyprag.bank), BANK/init, run_config.json,
trainer_log.jsonl (loss per batch of passages) and encode_summary.json. The progress bar counts the
trained tokens, moving (with the passages done and the step within the batch) at every optimizer step.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from transformers import TrainingArguments

from .core.dyprag_arguments import EncodeArguments
from .core.errors import RunStopped, UserError, main_guard

logger = logging.getLogger(__name__)

STAGE = "encode"
SUMMARY_FILE = "encode_summary.json"


@dataclass
class EncodeTrainingArguments(TrainingArguments):
    """TrainingArguments with the original PRAG encoding defaults (torch AdamW, no scheduler)."""

    learning_rate: float = field(default=3e-4, metadata={"help": "AdamW learning rate per passage (the original: "
                                                                 "3e-4, constant)."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Passes over each passage's texts (the original: "
                                                                   "1; 2 for PopQA)."})
    per_device_train_batch_size: int = field(default=1, metadata={"help": "Texts of one passage per optimizer step "
                                                                          "(the original: 1)."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (torch's default, which the "
                                                                "original uses)."})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "'last': continue the bank in output_dir (its passages are skipped, its "
                                        "initial LoRA reused)."})

    def __post_init__(self) -> None:
        if self.num_train_epochs != int(self.num_train_epochs) or self.num_train_epochs < 1:
            raise UserError(f"--num_train_epochs must be a whole number >= 1, got {self.num_train_epochs}.")
        if self.resume_from_checkpoint not in (None, "last", "true", "True", True):
            raise UserError(f"--resume_from_checkpoint {self.resume_from_checkpoint}: encode continues the bank in "
                            f"--output_dir; pass 'last'.")
        super().__post_init__()


def _bank_files(out: Path) -> list[Path]:
    """What an encode run writes into its output_dir (removed by --overwrite_output_dir, nothing else)."""
    from dyprag.bank_encoding import INIT_DIR

    from .core.callbacks import LOG_FILE

    return [p for pattern in ("index*.json", "*shard-*.safetensors", ".*.tmp", INIT_DIR, SUMMARY_FILE, LOG_FILE)
            for p in out.glob(pattern)]


def _read_passages(enc_args: EncodeArguments) -> tuple[list[Any], str | None, str | None]:
    """The records' passages (dyprag.records.Passage), the augmentation fields' model name (detected) and the
    few-shot block of the chain-of-thought texts (None without --with_cot)."""
    from dyprag.prompts import read_fewshot
    from dyprag.records import RecordError, collect_passages, detect_augment_model, load_records

    try:
        fewshot = read_fewshot(enc_args.fewshot_file) if enc_args.with_cot else None
    except RecordError as err:
        raise UserError(f"--fewshot_file {err}") from None

    try:
        records = load_records(enc_args.input_file)[: enc_args.max_samples]
        has_augment = any(r.get("augment") for r in records)
        augment_name = enc_args.augment_model_name or (detect_augment_model(records) if has_augment else None)
    except RecordError as err:
        raise UserError(f"--input_file: {err}") from None
    passages = collect_passages(records, augment_name)
    if not passages:
        raise UserError(f"--input_file {enc_args.input_file} holds no passages to encode; give records with "
                        f"'passages' (python -m stages.retrieve or stages.augment fills them).")
    return passages, augment_name, fewshot


def _encoded_ids(out: Path) -> set[str]:
    from dyprag.bank import LoraBankError
    from dyprag.bank_encoding import encoded_ids

    try:
        return encoded_ids(out)
    except LoraBankError as err:
        raise UserError(f"--resume_from_checkpoint: {err} Or replace the bank: --overwrite_output_dir instead of "
                        f"--resume_from_checkpoint.") from None


def _model_and_init(model_args: Any, enc_args: EncodeArguments, training_args: EncodeTrainingArguments, spec: Any,
                    out: Path, resume: bool, rank: int) -> tuple[Any, Any, Any]:
    """The tokenizer, the frozen model (on this rank's device, in the compute dtype) and the bank's initial LoRA."""
    from dyprag.bank import LoraBankError
    from dyprag.bank_encoding import initial_lora
    from dyprag.lora import target_module_names

    from .core.loader import load_frozen_model, load_tokenizer

    tokenizer = load_tokenizer(model_args)
    model = load_frozen_model(tokenizer, model_args, bf16=training_args.bf16, fp16=training_args.fp16)
    try:
        target_module_names(model, spec)
    except ValueError as err:
        raise UserError(f"--lora_target {enc_args.lora_target}: {err}; name the model's MLP projections.") from None
    try:
        init = initial_lora(model, spec, out, resume=resume, seed=training_args.seed,
                            base_model=model_args.model_name_or_path, write=rank == 0)
    except LoraBankError as err:
        raise UserError(str(err)) from None
    return tokenizer, model, init


def run_encode(argv: list[str] | None = None) -> None:
    import torch

    from dyprag.bank import LoraBankWriter
    from dyprag.bank_encoding import NonFiniteLoss, encode_into_bank, shared_rows, training_texts
    from dyprag.lora import LoraSpec
    from dyprag.passage_training import EncodeConfig

    from .core.arguments import ModelArguments, RunArguments
    from .core.distributed import gather_shares, rank_share
    from .core.stage import start_stage

    # 1. arguments; --resume_from_checkpoint continues the bank, --overwrite_output_dir replaces its files only
    (model_args, enc_args, training_args, run_args), run = start_stage(
        STAGE, [ModelArguments, EncodeArguments, EncodeTrainingArguments, RunArguments], argv, zero3=False,
        resumable=True)
    out, rank, world, resume = run.output_dir, run.rank, run.world, bool(training_args.resume_from_checkpoint)
    for path in _bank_files(out) if run_args.overwrite_output_dir and not resume and rank == 0 else []:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    spec = LoraSpec(enc_args.lora_rank, enc_args.lora_alpha, tuple(t.strip() for t in enc_args.lora_target.split(",")
                                                                    if t.strip()))
    recipe = EncodeConfig(learning_rate=training_args.learning_rate, num_epochs=int(training_args.num_train_epochs),
                          texts_per_step=training_args.per_device_train_batch_size,
                          weight_decay=training_args.weight_decay,
                          betas=(training_args.adam_beta1, training_args.adam_beta2), eps=training_args.adam_epsilon,
                          max_length=enc_args.cutoff_len, max_batch_tokens=enc_args.max_batch_tokens)

    # 2. records -> passages; one LoRA per distinct passage not yet in the bank, each rank its share
    passages, augment_name, fewshot = _read_passages(enc_args)
    bare = sum(1 for p in passages if not p.qas)
    if bare:
        logger.warning("%d of %d passages have no augmentation (QA pairs): they are trained on the passage text "
                       "alone.", bare, len(passages))
    done = _encoded_ids(out) & {p.id for p in passages} if resume else set()
    aliases = shared_rows(passages, done)
    todo = rank_share([p for p in passages if p.id in aliases], rank, world)
    if world > 1:  # every rank has read the same bank state before any rank writes to it
        torch.distributed.barrier()
    logger.info("encoding %d passages as %d distinct ones (%d already in the bank) on %d rank(s); augmentation "
                "fields: %s", len(passages) - len(done), len(aliases), len(done), world, augment_name or "none")

    # 3. tokenizer, frozen model in the compute dtype, the shared initialisation
    tokenizer, model, init = _model_and_init(model_args, enc_args, training_args, spec, out, resume, rank)

    # 4. train this rank's passages batch by batch, each finished batch straight into the bank
    texts = training_texts(tokenizer, todo, enc_args.cutoff_len, enc_args.with_cot, fewshot)
    run.start_wandb()
    start = time.time()
    writer = LoraBankWriter(out, spec, model_args.model_name_or_path, shard_size=enc_args.shard_size,
                            part=f"rank{rank:05d}")
    try:
        result = encode_into_bank(model, spec, init, todo, texts, aliases, recipe, writer, tokenizer.pad_token_id,
                                  passages_per_batch=enc_args.passages_per_batch,
                                  skip_nonfinite=run_args.nan_policy == "skip",
                                  log=partial(_log, out) if rank == 0 else None, show_progress=rank == 0)
    except NonFiniteLoss as err:
        raise RunStopped(f"{err}; nothing of this batch was written, the finished shards in {out} are kept and "
                         f"--resume_from_checkpoint last continues from them. Lower --learning_rate and re-run with "
                         f"--resume_from_checkpoint last, or pass --nan_policy skip to leave such passages out of "
                         f"the bank.") from None
    writer.close()

    # 5. one bank: rank 0 joins every rank's index once all are written, then checks it is complete
    skipped = gather_shares(result.skipped, world)  # a collective: every rank has written its part by then
    tokens = sum(gather_shares([result.tokens], world))
    if rank == 0:
        _finish_bank(out, passages, skipped, run_args.plot_loss, {
            "encoded_now": len(passages) - len(done) - len(skipped),
            "distinct_now": len(aliases) - len(set(skipped) & set(aliases)), "skipped_passages": len(skipped),
            "skipped_passage_ids": skipped, "without_augmentation": bare, "augment_model_name": augment_name,
            "ranks": world, "seconds": round(time.time() - start, 2), "tokens": tokens, "spec": spec.to_dict(),
            "recipe": {"learning_rate": recipe.learning_rate, "num_epochs": recipe.num_epochs,
                       "texts_per_step": recipe.texts_per_step, "weight_decay": recipe.weight_decay}})


def _finish_bank(out: Path, passages: list[Any], skipped: list[str], plot: bool, summary: dict[str, Any]) -> None:
    """Join the ranks' part indexes, check every passage is in the bank (or skipped), write the summary."""
    from dyprag.bank import LoraBank, LoraBankError, merge_parts

    from .core.callbacks import plot_loss

    merge_parts(out)
    try:
        bank = LoraBank(out, verify=False)
    except LoraBankError as err:
        raise UserError(str(err)) from None
    missing = [p.id for p in passages if p.id not in bank and p.id not in skipped]
    if missing:
        raise UserError(f"the bank in {out} lacks {len(missing)} passages (e.g. {missing[0]}); re-run with "
                        f"--resume_from_checkpoint last.")
    summary = {"passages": len(bank), **summary}
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    logger.info("LoRA bank %s: %d passages (%s)", out, len(bank), json.dumps(summary))
    if plot:
        plot_loss(out, keys=("loss",))
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.run.summary.update({f"encode/{k}": v for k, v in summary.items() if isinstance(v, (int, float))})
        wandb.finish()


def _log(out: Path, record: dict[str, Any]) -> None:
    """One line of trainer_log.jsonl (and W&B when a run is active); rank 0 calls it."""
    from .core.callbacks import LOG_FILE

    with open(out / LOG_FILE, "a", encoding="utf-8") as file:
        file.write(json.dumps(record) + "\n")
    wandb = sys.modules.get("wandb")  # only when init_wandb started a run
    if wandb is not None and wandb.run is not None:
        wandb.log({f"encode/{k}": v for k, v in record.items() if k != "step"}, step=record["step"])


main = main_guard(run_encode)

if __name__ == "__main__":
    main()
