"""prag_eval: answer PRAG records with vanilla / RAG / PRAG / PRAG-Combine / DyPRAG / DyPRAG-Combine, score EM/F1.

    python -m stages.prag_eval --model_name_or_path M --data_file records.json --bank_dir BANK \\
        --output_dir OUT [--methods vanilla,rag,prag,prag_combine] [--top_k 3] [--with_cot --fewshot_file F]
    python -m stages.prag_eval ... --projector_dir PROJ   # + dyprag, dyprag_combine (stages.projector's output)
    bash launch/prag_eval.sh ...   # the same on several ranks: each answers its share of the questions

For every question the LoRAs of its top-k passages (bank keys "<test_id>_<pid>", written by
`stages.encode`) are summed (rank concatenation, as the original) and injected into the frozen
model; with `--projector_dir` the trained parameter projector turns the same passages into
LoRAs at question time instead (averaged, `--dyprag_combination`). Answers are greedy, batched
(`--per_device_eval_batch_size`), with the original prompts (direct: "... The answer is", or
chain-of-thought with few-shot examples). Writes OUT/results.json (the table, a table per
sub-type too where the records carry `type` as stages.benchmark writes them, and the run config),
OUT/results.md, OUT/predictions.jsonl (one line per question and method), and logs the table to
W&B (`--report_to wandb`, offline without an account).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .core.errors import UserError, main_guard

logger = logging.getLogger(__name__)

STAGE = "prag_eval"


@dataclass
class PragEvalArguments:
    data_file: str | None = field(default=None, metadata={"help": "Question records in the PRAG format (JSON list "
                                                                  "with question, answer, passages)."})
    bank_dir: str | None = field(default=None, metadata={"help": "LoRA bank of the records' passages (from "
                                                                 "stages.encode); needed by prag and prag_combine."})
    projector_dir: str | None = field(default=None, metadata={"help": "Trained parameter projector (the output_dir "
                                                                      "of stages.projector); needed by dyprag and "
                                                                      "dyprag_combine."})
    dyprag_combination: Literal["factors", "deltas"] = field(
        default="factors", metadata={"help": "How a question's generated LoRAs are combined: factors (average A and B "
                                             "separately, the original) or deltas (average B@A exactly, rank k*r)."})
    methods: str | None = field(default=None,
                                metadata={"help": "Comma-separated methods: vanilla (question only), rag (passages in "
                                                  "context), prag (passage LoRAs), prag_combine (LoRAs + passages), "
                                                  "dyprag (generated LoRAs), dyprag_combine (generated LoRAs + "
                                                  "passages). Default: the first four, plus the dyprag two with "
                                                  "--projector_dir."})
    top_k: int = field(default=3, metadata={"help": "Passages per question (in context and/or as LoRAs)."})
    with_cot: bool = field(default=False, metadata={"help": "Chain-of-thought prompts (needs --fewshot_file); the "
                                                            "answer is read after 'the answer is'."})
    fewshot_file: str | None = field(default=None, metadata={"help": "JSON list of {question, answer} examples for "
                                                                     "the chain-of-thought prompt."})
    max_new_tokens: int | None = field(default=None, metadata={"help": "Tokens generated per answer (default: 20 "
                                                                       "direct, 128 chain-of-thought, as the "
                                                                       "original)."})
    split: str | None = field(default=None, metadata={"help": "Keep only records whose 'split' field has this value "
                                                              "(e.g. test for the embedded demo_qa)."})
    max_samples: int | None = field(default=None, metadata={"help": "Answer only the first N records."})

    def __post_init__(self) -> None:
        if not self.data_file:
            raise UserError("--data_file is required: the PRAG records to answer.")
        if self.top_k < 1:
            raise UserError(f"--top_k must be at least 1, got {self.top_k}.")
        if self.with_cot and not self.fewshot_file:
            raise UserError("--with_cot needs --fewshot_file: a JSON list of {question, answer} examples whose "
                            "answers end with 'So the answer is ...'.")
        if self.max_new_tokens is None:
            self.max_new_tokens = 128 if self.with_cot else 20
        if self.methods is None:
            self.methods = "vanilla,rag,prag,prag_combine" + (",dyprag,dyprag_combine" if self.projector_dir else "")

    @property
    def method_names(self) -> list[str]:
        return [name.strip() for name in self.methods.split(",") if name.strip()]


# ----------------------------------------------------------------- ranks (shared with stages.augment)

def rank_share(items: list[Any], rank: int, world: int) -> list[Any]:
    """This rank's items: every world-th one, starting at `rank` (balanced, order-preserving)."""
    return items[rank::world]


def gather_shares(share: list[Any], world: int) -> list[Any]:
    """Undo `rank_share` on every rank: all ranks' shares interleaved back into the full order."""
    if world == 1:
        return share
    import torch.distributed as dist

    shares: list[list[Any]] = [[] for _ in range(world)]
    dist.all_gather_object(shares, share)
    merged = []
    for position in range(max(len(s) for s in shares)):
        merged += [s[position] for s in shares if position < len(s)]
    return merged


def check_output_dir(output_dir: str, overwrite: bool) -> Path:
    """Refuse a folder that holds files unless --overwrite_output_dir; create it.

    Only global rank 0 judges: the other ranks may look after rank 0 has written its first
    file and would take it for an old run (if rank 0 refuses, the launcher stops them all).
    """
    out = Path(output_dir)
    if os.environ.get("RANK", "0") == "0" and out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--output_dir {out} already holds files; pick a new folder or add --overwrite_output_dir.")
    out.mkdir(parents=True, exist_ok=True)
    return out


# ------------------------------------------------------------------------------------ the stage

def _read_fewshot(path: str) -> str:
    from dyprag.prompts import format_fewshot

    try:
        examples = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"--fewshot_file {path} could not be read as JSON ({err}).") from None
    if not isinstance(examples, list) or not all(isinstance(e, dict) and {"question", "answer"} <= e.keys()
                                                  for e in examples):
        raise UserError(f"--fewshot_file {path} must be a JSON list of {{question, answer}} objects.")
    return format_fewshot(examples)


def _projector_loras(eval_args: PragEvalArguments, model: Any, tokenizer: Any) -> Any:
    """DyPRAG's provider: the trained projector (checked against this model) on this rank's device."""
    from dyprag.projector_model import CONFIG_FILE, ProjectorConfig, ProjectorError, ProjectorLoras, load_projector

    from .core.distributed import local_device

    folder = Path(eval_args.projector_dir)
    if not (folder / CONFIG_FILE).is_file():
        raise UserError(f"--projector_dir {folder} holds no {CONFIG_FILE}; point it at a stages.projector output_dir "
                        f"(or one of its checkpoint-N folders).")
    try:
        projector = load_projector(folder, device=local_device())
    except ProjectorError as err:
        raise UserError(f"--projector_dir: {err}") from None
    try:
        expected = ProjectorConfig.for_model(model, projector.config.spec)
    except ValueError as err:
        raise UserError(f"--projector_dir {folder}: {err}") from None
    if (expected.modules, expected.hidden_size) != (projector.config.modules, projector.config.hidden_size):
        raise UserError(f"--projector_dir {folder} was trained for {projector.config.base_model_name_or_path}, whose "
                        f"layers differ from --model_name_or_path; evaluate it with that model.")
    return ProjectorLoras(projector, model, tokenizer, eval_args.top_k, eval_args.dyprag_combination)


def log_table_to_wandb(rows: list[dict[str, Any]]) -> None:
    """The results table as a W&B table plus per-method summary values (when a run is active)."""
    import wandb

    if wandb.run is None:
        return
    columns = ["method", "questions", "em", "f1", "precision", "recall"]
    wandb.log({f"{STAGE}/results": wandb.Table(columns=columns, data=[[row[c] for c in columns] for row in rows])})
    for row in rows:
        for key in ("em", "f1"):
            wandb.run.summary[f"{STAGE}/{row['method']}/{key}"] = row[key]
    wandb.finish()


def run_prag_eval(argv: list[str] | None = None) -> None:
    from transformers import TrainingArguments

    from dyprag.inference import (METHODS, BankLoras, answer_questions, results_by_type, results_markdown,
                                  results_table, types_markdown)
    from dyprag.records import RecordError, load_records

    from .core.callbacks import init_wandb
    from .core.stage import resolved_config, save_config
    from .core.distributed import zero_stage
    from .core.arguments import FinetuningArguments, ModelArguments, RunArguments, parse_args
    from .core.loader import check_model_args, get_compute_dtype, load_model, load_tokenizer
    from .core.distributed import local_device

    # 1. arguments and checks (before anything is loaded)
    model_args, eval_args, training_args, run_args = parse_args(
        [ModelArguments, PragEvalArguments, TrainingArguments, RunArguments], argv, STAGE)
    finetuning_args = FinetuningArguments()  # inference only: adapters given with the model are merged
    check_model_args(model_args, finetuning_args, zero_stage(training_args.deepspeed))
    if zero_stage(training_args.deepspeed) == 3:
        raise UserError(f"--deepspeed {training_args.deepspeed} is ZeRO-3, which prag_eval cannot use: it generates "
                        f"data parallel (each rank holds the whole model); use a ZeRO-0/2 config such as "
                        f"ds_configs/zero2.json.")
    unknown = [m for m in eval_args.method_names if m not in METHODS]
    if unknown or not eval_args.method_names:
        raise UserError(f"--methods: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(METHODS)}.")
    methods = [METHODS[m] for m in eval_args.method_names]
    if any(m.lora == "prag" for m in methods) and not eval_args.bank_dir:
        raise UserError("--methods prag/prag_combine need --bank_dir: the LoRA bank written by stages.encode.")
    if any(m.lora == "dyprag" for m in methods) and not eval_args.projector_dir:
        raise UserError("--methods dyprag/dyprag_combine need --projector_dir: the projector written by "
                        "stages.projector.")
    fewshot = _read_fewshot(eval_args.fewshot_file) if eval_args.with_cot else None
    rank, world = training_args.process_index, training_args.world_size  # sets up the ranks under DeepSpeed
    out = check_output_dir(training_args.output_dir, run_args.overwrite_output_dir)
    config = resolved_config(STAGE, model_args, eval_args, training_args, run_args)
    save_config(str(out), config)

    # 2. records: the chosen split, answers required (they are scored)
    try:
        records = load_records(eval_args.data_file)
    except RecordError as err:
        raise UserError(f"--data_file: {err}") from None
    if eval_args.split is not None:
        records = [r for r in records if r.get("split") == eval_args.split]
    records = records[: eval_args.max_samples]
    if not records:
        fix = (f" with split {eval_args.split!r}; pick a --split its records have" if eval_args.split
               else "; pass PRAG records with a question and gold answers")
        raise UserError(f"--data_file {eval_args.data_file} holds no records to answer{fix}.")
    if any(not r["answer"] for r in records):
        raise UserError(f"--data_file {eval_args.data_file}: every record needs gold answers to be scored.")

    # 3. the bank (every shard the records need checked now, not midway), then the frozen model
    #    (fp32 / bf16 / fp16 from the flags) on this rank's device and the projector
    compute_dtype = get_compute_dtype(training_args.bf16, training_args.fp16)
    providers: dict[str, Any] = {}
    if eval_args.bank_dir:
        from dyprag.bank import LoraBank, LoraBankError

        if not Path(eval_args.bank_dir).is_dir():
            raise UserError(f"--bank_dir {eval_args.bank_dir} is not a folder; encode the records first "
                            f"(python -m stages.encode).")
        try:
            loras = providers["prag"] = BankLoras(LoraBank(eval_args.bank_dir), eval_args.top_k, dtype=compute_dtype,
                                                  device=local_device())
            missing = loras.missing(records)
            if missing:
                raise UserError(f"--bank_dir {eval_args.bank_dir} has no LoRA for {len(missing)} passage(s) of the "
                                f"records (e.g. {', '.join(missing[:3])}); encode this --data_file with "
                                f"stages.encode.")
            loras.check(records)
        except LoraBankError as err:
            raise UserError(f"--bank_dir: {err}") from None
    tokenizer = load_tokenizer(model_args)
    model = load_model(tokenizer, model_args, finetuning_args, is_trainable=False, compute_dtype=compute_dtype)
    if model_args.quantization_bit is None:
        model.to(local_device())
    if eval_args.projector_dir:
        providers["dyprag"] = _projector_loras(eval_args, model, tokenizer)

    # 4. answer this rank's share with every method; gather each method's answers in record order
    share = rank_share(records, rank, world)
    predictions: list[dict[str, Any]] = []
    for method in methods:
        logger.info("answering %d questions with %s", len(share), method.name)
        answers = answer_questions(model, tokenizer, share, method, lora=providers.get(method.lora),
                                   top_k=eval_args.top_k,
                                   with_cot=eval_args.with_cot, fewshot=fewshot,
                                   batch_size=training_args.per_device_eval_batch_size,
                                   max_new_tokens=eval_args.max_new_tokens, show_progress=rank == 0)
        predictions += gather_shares(answers, world)
    if rank != 0:
        return

    # 5. results: JSON + markdown + predictions, printed, and to W&B
    rows, by_type = results_table(predictions), results_by_type(predictions)
    (out / "results.json").write_text(json.dumps({"results": rows, **({"by_type": by_type} if by_type else {}),
                                                  "config": config}, indent=2), encoding="utf-8")
    table = results_markdown(rows)
    if by_type:  # records with sub-types (stages.benchmark): EM / F1 of each beside the whole set's
        table += "\nEM / F1 per sub-type:\n\n" + types_markdown(by_type, rows)
    (out / "results.md").write_text(f"# PRAG evaluation: {os.path.basename(eval_args.data_file)}\n\n{table}",
                                    encoding="utf-8")
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as file:
        file.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions)
    print(table, flush=True)
    init_wandb(STAGE, training_args, run_args, config)
    log_table_to_wandb(rows)


main = main_guard(run_prag_eval)

if __name__ == "__main__":
    main()
