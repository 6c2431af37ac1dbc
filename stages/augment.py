"""augment: PRAG's data step: passages for each question, then a rewrite and QA pairs per passage.

    python -m stages.augment --model_name_or_path M --input_file questions.json --output_dir OUT \\
        [--index_dir IDX | --corpus corpus.jsonl] [--top_k 3] [--candidates 13] [--num_qa 3] [--max_attempts 5]
    bash launch/augment.sh ...   # the same on several ranks: each augments its share of the records

Input: PRAG records or plain question files (JSON list / JSON lines with `question`, or a .txt
with one question per line). Passages come from the records (`passages`) or from BM25
(`--index_dir` built by stages.retrieve, or `--corpus` indexed on the fly); `--passages_from`
picks. The LLM (any causal LM; by default, as in the original, the model you will train) writes
the rewrite and the QA pairs with the original prompts; QA replies are parsed from JSON and
asked again at most `--max_attempts` times; passages that never parse are skipped. With
`--candidates N` (the original: 13) each question's first N passages are tried in order until
`--top_k` of them parsed, so a skipped passage is replaced by the next one (`dyprag.qa_generation.refill`).

Output: OUT/augmented.json (PRAG records with `<model>_rewrite` / `<model>_qa`, `<model>` =
the model path's basename, lower-case, or `--augment_model_name`) and OUT/augment_summary.json
(distinct passages, augmented, skipped and why, QA requests, passages tried in the records, and
`refilled`: kept passages that replace a skipped one), also logged.
A text that several records share is augmented once (on one rank) and its augmentation written
into each of them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .core.dyprag_arguments import AugmentArguments
from .core.errors import UserError, main_guard

logger = logging.getLogger(__name__)

STAGE = "augment"
OUTPUT_FILE = "augmented.json"
SUMMARY_FILE = "augment_summary.json"


def candidate_passages(records: list[dict[str, Any]], args: AugmentArguments
                       ) -> tuple[list[list[str]], list[list[str]] | None]:
    """The candidate passages per record (its own, or BM25's, the first --candidates) and their corpus ids if known."""
    use_records = args.passages_from == "records" or (
        args.passages_from == "auto" and all(r.get("passages") for r in records))
    if use_records:
        if not all(r.get("passages") for r in records):
            raise UserError("--passages_from records: some records have no 'passages'; retrieve them "
                            "(--index_dir / --corpus with --passages_from retrieval).")
        texts = [list(r["passages"][: args.candidates]) for r in records]
        aligned = all(len(r.get("passage_ids") or []) == len(r["passages"]) for r in records)
        return texts, [list(r["passage_ids"][: args.candidates]) for r in records] if aligned else None
    if not args.index_dir and not args.corpus:
        raise UserError("the records carry no passages: give --index_dir (python -m stages.retrieve) or --corpus to "
                        "retrieve them.")
    from dyprag.retrieval import BM25Index, CorpusError

    try:
        index = BM25Index.load(args.index_dir) if args.index_dir else BM25Index.from_corpus_file(args.corpus)
    except CorpusError as err:
        raise UserError(str(err)) from None
    hits = index.search([r["question"] for r in records], args.candidates, show_progress=True)
    return [[h.text for h in row] for row in hits], [[h.id for h in row] for row in hits]


def run_augment(argv: list[str] | None = None) -> None:
    from transformers import TrainingArguments, set_seed

    from dyprag.qa_generation import (AugmentStats, HFGenerator, augment_passages, augment_records, distinct_passages,
                                      refill)
    from dyprag.records import RecordError, augment_model_name, load_records, save_records

    from .core.arguments import ModelArguments, RunArguments
    from .core.distributed import gather_shares, rank_share
    from .core.loader import load_frozen_model, load_tokenizer
    from .core.stage import start_stage

    # 1. arguments
    (model_args, aug_args, training_args, run_args), run = start_stage(
        STAGE, [ModelArguments, AugmentArguments, TrainingArguments, RunArguments], argv, zero3=False)
    rank, world = run.rank, run.world
    set_seed(training_args.seed + rank)  # sampling differs across ranks but is reproducible

    # 2. questions and their candidate passages (retrieval runs on every rank: it is cheap)
    try:
        records = load_records(aug_args.input_file)[: aug_args.max_samples]
    except RecordError as err:
        raise UserError(f"--input_file: {err}") from None
    if not records:
        raise UserError(f"--input_file {aug_args.input_file} holds no questions; pass PRAG records with a 'question' "
                        f"(JSON list or JSON lines) or a .txt with one question a line.")
    passages, passage_ids = candidate_passages(records, aug_args)

    # 3. the augmenting LLM, batched generation
    tokenizer = load_tokenizer(model_args)
    model = load_frozen_model(tokenizer, model_args, bf16=training_args.bf16, fp16=training_args.fp16)
    sampling = {"do_sample": True, "temperature": aug_args.temperature} if aug_args.do_sample else {"do_sample": False}
    generate = HFGenerator(model, tokenizer, batch_size=training_args.per_device_eval_batch_size,
                           show_progress=rank == 0, max_new_tokens=aug_args.max_new_tokens, **sampling)
    name = aug_args.augment_model_name or augment_model_name(model_args.model_name_or_path)

    # 4. augment the distinct passages, each rank its share, in rounds until every question has --top_k
    #    parsed passages or no candidate left; build the records in order
    first_id = dict(zip(*distinct_passages(records, passages)))
    total = AugmentStats()

    def augment_shared(texts: list[str]) -> list:
        share = rank_share(list(range(len(texts))), rank, world)
        results, stats = augment_passages([texts[i] for i in share], generate, aug_args.num_qa,
                                          aug_args.max_attempts, [first_id[texts[i]] for i in share])
        for part in gather_shares([stats], world):
            total.merge(part)
        return gather_shares(results, world)

    tried, results = refill(passages, aug_args.top_k, augment_shared)
    if rank != 0:
        return
    augmented = augment_records(records, tried, results, name,
                                [ids[:len(t)] for ids, t in zip(passage_ids, tried)] if passage_ids else None,
                                keep_skipped=aug_args.keep_skipped)
    refilled = sum(results[text] is not None for texts in tried for text in texts[aug_args.top_k:])

    # 5. write the records and the summary; report the skips
    out = run.output_dir
    save_records(out / OUTPUT_FILE, augmented)
    summary = {"augment_model_name": name, "records": len(augmented),
               "passages_in_records": sum(map(len, tried)), "refilled": refilled,
               **total.to_dict()}
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    logger.info("augmented %d of %d distinct passages (%d tried in the records; %d kept in place of a skipped "
                "one); skipped %d (QA never parsed: %d, empty rewrite: %d) after %d QA requests; wrote %s",
                total.augmented, total.passages, summary["passages_in_records"], refilled, total.skipped,
                total.skipped_qa, total.skipped_rewrite, total.qa_requests, Path(out / OUTPUT_FILE))
    print(json.dumps({k: v for k, v in summary.items() if k != "skipped_ids"}), flush=True)


main = main_guard(run_augment)

if __name__ == "__main__":
    main()
