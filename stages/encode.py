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
frozen model) and write their own shards; rank 0 joins the indexes into one bank. A killed
run continues with --resume (finished shards are kept; a shard is written under a temporary
name and renamed whole, so the index never points at a half-written one).

A passage whose loss becomes NaN/inf stops the run (--nan_policy stop: the passages of the
earlier batches are written to the bank first, --resume continues) or is left out of the bank
(--nan_policy skip: counted in the log and encode_summary.json; a --resume run tries it
again). The other passages of its batch train exactly as they would without it.

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
from pathlib import Path
from typing import Any

from transformers import TrainingArguments

from .core.errors import RunStopped, UserError, main_guard

logger = logging.getLogger(__name__)

STAGE = "encode"
INIT_DIR = "init"
SUMMARY_FILE = "encode_summary.json"


@dataclass
class EncodeArguments:
    input_file: str | None = field(default=None, metadata={"help": "PRAG records to encode (JSON list / JSON lines), "
                                                                   "e.g. stages.augment's augmented.json."})
    max_samples: int | None = field(default=None, metadata={"help": "Encode only the first N records (the "
                                                                   "original's --sample)."})
    augment_model_name: str | None = field(default=None, metadata={"help": "Prefix of the augmentation fields "
                                                                           "(default: detected from the records)."})
    lora_rank: int = field(default=2, metadata={"help": "LoRA rank r of every passage (the original: 2)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha; the delta is scaled by alpha/r (the original: "
                                                          "32)."})
    lora_target: str = field(default="gate_proj,up_proj,down_proj",
                             metadata={"help": "Comma-separated linear layer names that carry the LoRA, in every "
                                               "layer (the original: the MLP projections)."})
    with_cot: bool = field(default=False, metadata={"help": "Train on full answers with the chain-of-thought prompt "
                                                            "(needs --fewshot_file), as the original's --with_cot."})
    fewshot_file: str | None = field(default=None, metadata={"help": "JSON list of {question, answer} examples for "
                                                                     "the chain-of-thought prompt."})
    cutoff_len: int = field(default=3000, metadata={"help": "Tokens kept per training text: a longer text keeps its "
                                                            "first cutoff_len tokens, and the log counts such texts "
                                                            "(the original: 3000)."})
    passages_per_batch: int = field(default=32, metadata={"help": "Passages whose LoRAs train together in one "
                                                                  "batched forward/backward."})
    max_batch_tokens: int | None = field(
        default=None, metadata={"help": "Padded tokens per forward; a step with more runs as several forwards "
                                        "(memory bound). Default: 16384 on an accelerator, 512 on a CPU."})
    shard_size: int = field(default=256, metadata={"help": "Passages per bank shard file."})
    resume: bool = field(default=False, metadata={"help": "Continue the bank in output_dir: passages already in it "
                                                          "are skipped."})

    def __post_init__(self) -> None:
        if not self.input_file:
            raise UserError("--input_file is required: the PRAG records whose passages are encoded.")
        if self.with_cot and not self.fewshot_file:
            raise UserError("--with_cot needs --fewshot_file: a JSON list of {question, answer} examples.")
        if self.max_batch_tokens is None:
            from dyprag.passage_training import default_max_batch_tokens

            from .core.distributed import local_device

            self.max_batch_tokens = default_max_batch_tokens(local_device())
        for name in ("lora_rank", "lora_alpha", "cutoff_len", "passages_per_batch", "max_batch_tokens", "shard_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1, got {getattr(self, name)}.")


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


@dataclass
class Passage:
    id: str
    text: str
    rewrite: str | None
    qas: list[dict[str, str]]


def collect_passages(records: list[dict[str, Any]], augment_name: str | None) -> list[Passage]:
    """Every passage of every record, with its rewrite and QA pairs when the record has them."""
    from dyprag.records import passage_id

    passages = []
    for record in records:
        augments = {entry.get("pid", pid): entry for pid, entry in enumerate(record.get("augment") or [])}
        texts = list(record.get("passages") or [])
        for pid in sorted(set(range(len(texts))) | set(augments)):
            entry = augments.get(pid, {})
            text = entry.get("passage") or (texts[pid] if pid < len(texts) else None)
            if not text:
                continue
            passages.append(Passage(passage_id(record["test_id"], pid), text,
                                    entry.get(f"{augment_name}_rewrite") if augment_name else None,
                                    list(entry.get(f"{augment_name}_qa") or []) if augment_name else []))
    return passages


def _bank_files(out: Path) -> list[Path]:
    """What an encode run writes into its output_dir (removed by --overwrite_output_dir, nothing else)."""
    from .core.callbacks import LOG_FILE

    return [p for pattern in ("index*.json", "*shard-*.safetensors", ".*.tmp", INIT_DIR, SUMMARY_FILE, LOG_FILE)
            for p in out.glob(pattern)]


def _prepare_output_dir(out: Path, resume: bool, overwrite: bool, rank: int) -> Path:
    """Refuse to write over a bank unless asked: --resume continues it, --overwrite_output_dir replaces it."""
    if _bank_files(out) and not resume:
        if not overwrite:
            raise UserError(f"--output_dir {out} already holds a LoRA bank; add --resume to continue it, "
                            f"--overwrite_output_dir to replace it, or pick a new folder.")
        for path in _bank_files(out) if rank == 0 else []:  # only the run's own files; anything else stays
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def _encoded_ids(out: Path) -> set[str]:
    """Passage ids already in the bank: its index and the part indexes of an unfinished run (their shards checked)."""
    from dyprag.bank import INDEX_FILE, LoraBankError, check_shards, part_indexes

    try:
        check_shards(out)  # a corrupt shard would otherwise be kept in the continued bank
    except LoraBankError as err:
        raise UserError(f"--resume: {err} Or replace the bank: --overwrite_output_dir instead of --resume.") from None
    ids: set[str] = set()
    for index_file in [out / INDEX_FILE, *part_indexes(out)]:
        if index_file.is_file():
            ids |= set(json.loads(index_file.read_text(encoding="utf-8"))["passages"])
    return ids


def run_encode(argv: list[str] | None = None) -> None:
    import torch
    from tqdm.auto import tqdm

    from dyprag.bank import LoraBank, LoraBankError, LoraBankWriter, merge_parts
    from dyprag.passage_training import EncodeConfig, StepReport, encode_batch, init_lora, passage_texts, plan_batches, training_tokens
    from dyprag.lora import LoraSpec, read_peft_adapter, save_peft_adapter, target_module_names
    from dyprag.records import RecordError, detect_augment_model, load_records

    from .core.callbacks import init_wandb, plot_loss
    from .core.stage import resolved_config, save_config
    from .core.distributed import zero_stage
    from .core.arguments import FinetuningArguments, ModelArguments, RunArguments, parse_args
    from .core.loader import check_model_args, get_compute_dtype, load_model, load_tokenizer
    from .core.distributed import local_device
    from .prag_eval import _read_fewshot, gather_shares, rank_share

    # 1. arguments and checks
    model_args, enc_args, training_args, run_args = parse_args(
        [ModelArguments, EncodeArguments, EncodeTrainingArguments, RunArguments], argv, STAGE)
    finetuning_args = FinetuningArguments()  # the base stays frozen; adapters given with the model are merged
    check_model_args(model_args, finetuning_args, zero_stage(training_args.deepspeed))
    if zero_stage(training_args.deepspeed) == 3:
        raise UserError(f"--deepspeed {training_args.deepspeed} is ZeRO-3, which encode cannot use: it trains data "
                        f"parallel (each rank holds the frozen model); use a ZeRO-0/2 config such as "
                        f"ds_configs/zero2.json.")
    if training_args.num_train_epochs != int(training_args.num_train_epochs) or training_args.num_train_epochs < 1:
        raise UserError(f"--num_train_epochs must be a whole number >= 1, got {training_args.num_train_epochs}.")
    if not training_args.output_dir:
        raise UserError("--output_dir is required: the folder the LoRA bank is written into.")
    rank, world = training_args.process_index, training_args.world_size  # sets up the ranks under DeepSpeed
    out = _prepare_output_dir(Path(training_args.output_dir), enc_args.resume, run_args.overwrite_output_dir, rank)
    config = resolved_config(STAGE, model_args, enc_args, training_args, run_args)
    save_config(str(out), config)
    spec = LoraSpec(enc_args.lora_rank, enc_args.lora_alpha, tuple(t.strip() for t in enc_args.lora_target.split(",")
                                                                    if t.strip()))
    recipe = EncodeConfig(learning_rate=training_args.learning_rate, num_epochs=int(training_args.num_train_epochs),
                          texts_per_step=training_args.per_device_train_batch_size,
                          weight_decay=training_args.weight_decay,
                          betas=(training_args.adam_beta1, training_args.adam_beta2), eps=training_args.adam_epsilon,
                          max_length=enc_args.cutoff_len, max_batch_tokens=enc_args.max_batch_tokens)

    # 2. records -> passages (augmentation fields detected, never assumed)
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
    bare = sum(1 for p in passages if not p.qas)
    if bare:
        logger.warning("%d of %d passages have no augmentation (QA pairs): they are trained on the passage text "
                       "alone.", bare, len(passages))
    done = _encoded_ids(out) & {p.id for p in passages} if enc_args.resume else set()
    # One LoRA per distinct (text, rewrite, QA pairs): records that share a passage share its bank row.
    copies: dict[tuple[str, str | None, str], list[str]] = {}
    for p in passages:
        if p.id not in done:
            copies.setdefault((p.text, p.rewrite, json.dumps(p.qas, sort_keys=True)), []).append(p.id)
    first = {ids[0]: ids[1:] for ids in copies.values()}
    todo = rank_share([p for p in passages if p.id in first], rank, world)
    if world > 1:  # every rank has read the same bank state before any rank writes to it
        torch.distributed.barrier()
    logger.info("encoding %d passages as %d distinct ones (%d already in the bank) on %d rank(s); augmentation "
                "fields: %s", len(passages) - len(done), len(first), len(done), world, augment_name or "none")

    # 3. tokenizer, frozen model in the compute dtype, the shared initialisation
    tokenizer = load_tokenizer(model_args)
    model = load_model(tokenizer, model_args, finetuning_args, is_trainable=False,
                       compute_dtype=get_compute_dtype(training_args.bf16, training_args.fp16))
    if model_args.quantization_bit is None:
        model.to(local_device())
    try:
        target_module_names(model, spec)
    except ValueError as err:
        raise UserError(f"--lora_target {enc_args.lora_target}: {err}; name the model's MLP projections.") from None
    init_dir = out / INIT_DIR
    if enc_args.resume and init_dir.is_dir():  # train on from exactly the saved initialisation
        init, init_spec = read_peft_adapter(init_dir)
        if (init_spec.rank, init_spec.alpha) != (spec.rank, spec.alpha):
            raise UserError(f"{init_dir} holds a rank-{init_spec.rank} LoRA; encode with the bank's settings or a "
                            f"new --output_dir.")
    else:
        init = init_lora(model, spec, training_args.seed)  # the same on every rank (seeded)
        if rank == 0:
            save_peft_adapter(init, 0, spec, model_args.model_name_or_path, init_dir)
    fewshot = _read_fewshot(enc_args.fewshot_file) if enc_args.with_cot else None

    # 4. train this rank's passages batch by batch, each finished batch straight into the bank
    texts = [passage_texts(tokenizer, p.text, p.rewrite, p.qas, enc_args.with_cot, fewshot, max_length=sys.maxsize)
             for p in todo]
    too_long = sum(len(text) > enc_args.cutoff_len for row in texts for text in row)
    if too_long:
        logger.warning("%d of %d training texts are longer than --cutoff_len %d tokens: each keeps its first %d.",
                       too_long, sum(map(len, texts)), enc_args.cutoff_len, enc_args.cutoff_len)
    texts = [[text[: enc_args.cutoff_len] for text in row] for row in texts]
    init_wandb(STAGE, training_args, run_args, config)
    start = time.time()
    writer = LoraBankWriter(out, spec, model_args.model_name_or_path, shard_size=enc_args.shard_size,
                            part=f"rank{rank:05d}")
    batches = plan_batches([sum(map(len, t)) for t in texts], enc_args.passages_per_batch)
    skipped: list[str] = []  # passages whose loss became NaN/inf (--nan_policy skip)
    # The bar counts training tokens, so it moves at every optimizer step and its ETA holds across
    # batches of unequal passages; its postfix names the passages done and the step within the batch.
    encoded, trained = 0, 0  # passages of the finished batches; predicted tokens trained on
    with tqdm(total=training_tokens(texts, recipe), desc="encode", unit="tok", unit_scale=True,
              disable=rank != 0) as progress:
        for number, batch in enumerate(batches, start=1):
            batch_texts = [texts[i] for i in batch]

            def on_step(report: StepReport, number: int = number) -> None:
                nonlocal trained
                trained += report.tokens
                progress.set_postfix_str(f"passages {encoded + report.finished}/{len(todo)}, batch {number}/"
                                         f"{len(batches)} step {report.step}/{report.steps}", refresh=False)
                progress.update(report.tokens)

            before = trained
            result = encode_batch(model, spec, init, batch_texts, recipe, tokenizer.pad_token_id, on_step)
            progress.update(training_tokens(batch_texts, recipe) - (trained - before))  # diverged passages' rest
            encoded += len(batch)
            failed = [todo[i].id for i, finite in zip(batch, result.finite.tolist()) if not finite]
            if failed and run_args.nan_policy == "stop":
                writer.flush()  # the passages of the earlier batches go into the bank: --resume keeps them
                progress.close()  # the bar's last line before the message
                raise RunStopped(f"the training loss of passage(s) {', '.join(failed)} became NaN/inf (batch "
                                 f"{number}); nothing of this batch was written, the finished shards in {out} are "
                                 f"kept and --resume continues from them. Lower --learning_rate and re-run with "
                                 f"--resume, or pass --nan_policy skip to leave such passages out of the bank.")
            for row, i in enumerate(batch):
                if result.finite[row]:
                    writer.add(todo[i].id, result.weights, row, aliases=first[todo[i].id])
            if failed:
                skipped += [pid for failure in failed for pid in (failure, *first[failure])]
                logger.warning("non-finite training loss of passage(s) %s: left out of the bank (%d so far; a "
                               "--resume run tries them again)", ", ".join(failed), len(skipped))
            if rank == 0:
                losses = result.epoch_loss[result.finite]  # the skipped passages' losses are NaN
                _log(out, {"step": number, "passages": encoded,
                           **({"loss": losses[:, -1].mean().item(), "first_epoch_loss": losses[:, 0].mean().item()}
                              if len(losses) else {}),
                           **({"skipped_passages": len(skipped)} if skipped else {}),
                           "passages_per_second": encoded / (time.time() - start)})
    writer.close()

    # 5. one bank: rank 0 joins every rank's index once all are written, then checks it is complete
    skipped = gather_shares(skipped, world)  # a collective: every rank has written its part by then
    tokens = sum(gather_shares([trained], world))  # by all ranks
    if rank != 0:
        return
    merge_parts(out)
    try:
        bank = LoraBank(out, verify=False)
    except LoraBankError as err:
        raise UserError(str(err)) from None
    missing = [p.id for p in passages if p.id not in bank and p.id not in skipped]
    if missing:
        raise UserError(f"the bank in {out} lacks {len(missing)} passages (e.g. {missing[0]}); re-run with --resume.")
    elapsed = time.time() - start
    summary = {"passages": len(bank), "encoded_now": len(passages) - len(done) - len(skipped),
               "distinct_now": len(first) - len(set(skipped) & set(first)),
               "skipped_passages": len(skipped), "skipped_passage_ids": skipped,
               "without_augmentation": bare, "augment_model_name": augment_name, "ranks": world,
               "seconds": round(elapsed, 2), "tokens": tokens, "spec": spec.to_dict(), "recipe": {
                   "learning_rate": recipe.learning_rate, "num_epochs": recipe.num_epochs,
                   "texts_per_step": recipe.texts_per_step, "weight_decay": recipe.weight_decay}}
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    logger.info("LoRA bank %s: %d passages (%s)", out, len(bank), json.dumps(summary))
    if run_args.plot_loss:
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
