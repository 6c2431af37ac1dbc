"""prag_eval: answer PRAG records with vanilla / RAG / PRAG / PRAG-Combine / DyPRAG / DyPRAG-Combine, score EM/F1.

    python -m stages.prag_eval --model_name_or_path M --data_file records.json --bank_dir BANK \\
        --output_dir OUT [--methods vanilla,rag,prag,prag_combine] [--top_k 3] [--with_cot --fewshot_file F]
    python -m stages.prag_eval ... --projector_dir PROJ   # + dyprag, dyprag_combine (stages.projector's output)
    bash launch/prag_eval.sh ...   # the same on several ranks: each answers its share of the questions

For every question the LoRAs of its top-k passages (bank keys "<test_id>_<pid>", written by
`stages.encode`) are summed (rank concatenation, as the original) and injected into the frozen
model; with `--projector_dir` the trained parameter projector turns the same passages into
LoRAs at question time instead (averaged, `--combination`). Answers are greedy, batched
(`--per_device_eval_batch_size`), with the original prompts (direct: "... The answer is", or
chain-of-thought with few-shot examples). Writes OUT/results.json (the table, a table per
sub-type too where the records carry `type` as stages.benchmark writes them, and the run config;
EM, F1, precision and recall in percent), OUT/results.md, OUT/predictions.jsonl (one line per
question and method, each scored as a fraction), and logs the table to W&B (`--report_to wandb`,
offline without an account).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from .core.dyprag_arguments import PragEvalArguments
from .core.errors import UserError, main_guard

logger = logging.getLogger(__name__)

STAGE = "prag_eval"


def read_questions(eval_args: PragEvalArguments) -> list[dict[str, Any]]:
    """The records to answer: the chosen --split, the first --max_samples, each with gold answers (they are scored)."""
    from dyprag.records import RecordError, load_split

    try:
        records = load_split(eval_args.data_file, eval_args.split, eval_args.max_samples)
    except RecordError as err:
        raise UserError(f"--data_file: {err}") from None
    if not records:
        raise UserError(f"--data_file {eval_args.data_file} holds no records to answer; pass PRAG records with a "
                        f"question and gold answers.")
    if any(not r["answer"] for r in records):
        raise UserError(f"--data_file {eval_args.data_file}: every record needs gold answers to be scored.")
    return records


def bank_loras(eval_args: PragEvalArguments, records: list[dict[str, Any]], dtype: Any) -> Any:
    """PRAG's provider: the bank's LoRAs on this rank's device, every shard the records need checked now (not
    midway through answering)."""
    from dyprag.bank import LoraBank, LoraBankError
    from dyprag.inference import BankLoras

    from .core.distributed import local_device

    if not Path(eval_args.bank_dir).is_dir():
        raise UserError(f"--bank_dir {eval_args.bank_dir} is not a folder; encode the records first "
                        f"(python -m stages.encode).")
    try:
        loras = BankLoras(LoraBank(eval_args.bank_dir), eval_args.top_k, dtype=dtype, device=local_device())
        missing = loras.missing(records)
        if missing:
            raise UserError(f"--bank_dir {eval_args.bank_dir} has no LoRA for {len(missing)} passage(s) of the "
                            f"records (e.g. {', '.join(missing[:3])}); encode this --data_file with stages.encode.")
        loras.check(records)
    except LoraBankError as err:
        raise UserError(f"--bank_dir: {err}") from None
    return loras


def projector_loras(eval_args: PragEvalArguments, model: Any, tokenizer: Any) -> Any:
    """DyPRAG's provider: the trained projector (checked against this model) on this rank's device."""
    from dyprag.projector_model import ProjectorError, load_projector_loras

    from .core.distributed import local_device

    try:
        return load_projector_loras(eval_args.projector_dir, model, tokenizer, eval_args.top_k,
                                    eval_args.combination, device=local_device())
    except ProjectorError as err:
        raise UserError(f"--projector_dir {eval_args.projector_dir}: {err}") from None


def write_results(out: Path, predictions: list[dict[str, Any]], config: dict[str, Any], data_file: str
                  ) -> list[dict[str, Any]]:
    """results.json (the table, per sub-type too, the config), results.md, predictions.jsonl; the table printed.
    Returns the table's rows."""
    from dyprag.inference import results_by_type, results_markdown, results_table, types_markdown

    rows, by_type = results_table(predictions), results_by_type(predictions)
    (out / "results.json").write_text(json.dumps({"results": rows, **({"by_type": by_type} if by_type else {}),
                                                  "config": config}, indent=2), encoding="utf-8")
    table = results_markdown(rows)
    if by_type:  # records with sub-types (stages.benchmark): EM / F1 of each beside the whole set's
        table += "\nEM / F1 per sub-type:\n\n" + types_markdown(by_type, rows)
    (out / "results.md").write_text(f"# PRAG evaluation: {os.path.basename(data_file)}\n\n{table}", encoding="utf-8")
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as file:
        file.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions)
    print(table, flush=True)
    return rows


def log_table_to_wandb(rows: list[dict[str, Any]]) -> None:
    """The results table (percent) as a W&B table plus per-method summary values (when a run is active)."""
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

    from dyprag.inference import METHODS, answer_questions
    from dyprag.prompts import read_fewshot
    from dyprag.records import RecordError

    from .core.arguments import ModelArguments, RunArguments
    from .core.distributed import gather_shares, rank_share
    from .core.loader import get_compute_dtype, load_frozen_model, load_tokenizer
    from .core.stage import start_stage

    # 1. arguments (the methods and what they need checked), the few-shot examples
    (model_args, eval_args, training_args, run_args), run = start_stage(
        STAGE, [ModelArguments, PragEvalArguments, TrainingArguments, RunArguments], argv, zero3=False)
    methods = [METHODS[m] for m in eval_args.method_names]
    try:
        fewshot = read_fewshot(eval_args.fewshot_file) if eval_args.with_cot else None
    except RecordError as err:
        raise UserError(f"--fewshot_file {err}") from None

    # 2. records, the bank, then the frozen model (fp32 / bf16 / fp16 from the flags) and the projector
    records = read_questions(eval_args)
    providers: dict[str, Any] = {}
    if eval_args.bank_dir:
        providers["prag"] = bank_loras(eval_args, records, get_compute_dtype(training_args.bf16, training_args.fp16))
    tokenizer = load_tokenizer(model_args)
    model = load_frozen_model(tokenizer, model_args, bf16=training_args.bf16, fp16=training_args.fp16)
    if eval_args.projector_dir:
        providers["dyprag"] = projector_loras(eval_args, model, tokenizer)

    # 3. answer this rank's share with every method; gather each method's answers in record order
    share = rank_share(records, run.rank, run.world)
    predictions: list[dict[str, Any]] = []
    for method in methods:
        logger.info("answering %d questions with %s", len(share), method.name)
        answers = answer_questions(model, tokenizer, share, method, lora=providers.get(method.lora),
                                   top_k=eval_args.top_k, with_cot=eval_args.with_cot, fewshot=fewshot,
                                   batch_size=training_args.per_device_eval_batch_size,
                                   max_new_tokens=eval_args.max_new_tokens, show_progress=run.rank == 0)
        predictions += gather_shares(answers, run.world)
    if run.rank != 0:
        return

    # 4. results: JSON + markdown + predictions, printed, and to W&B
    rows = write_results(run.output_dir, predictions, run.config, eval_args.data_file)
    run.start_wandb()
    log_table_to_wandb(rows)


main = main_guard(run_prag_eval)

if __name__ == "__main__":
    main()
