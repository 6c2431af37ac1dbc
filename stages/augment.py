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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .core.errors import UserError, main_guard

logger = logging.getLogger(__name__)

STAGE = "augment"
OUTPUT_FILE = "augmented.json"
SUMMARY_FILE = "augment_summary.json"


@dataclass
class AugmentArguments:
    input_file: str | None = field(default=None, metadata={"help": "Questions: PRAG records (JSON list / JSON "
                                                                   "lines) or a .txt with one question a line."})
    passages_from: Literal["auto", "records", "retrieval"] = field(
        default="auto", metadata={"help": "Where passages come from: the records' own 'passages', BM25 retrieval, "
                                          "or auto (the records' when they have them, else retrieval)."})
    index_dir: str | None = field(default=None, metadata={"help": "BM25 index built by stages.retrieve."})
    corpus: str | None = field(default=None, metadata={"help": "Passage corpus (.jsonl / .tsv) indexed in memory "
                                                               "when no --index_dir is given."})
    top_k: int = field(default=3, metadata={"help": "Passages augmented per question."})
    candidates: int | None = field(
        default=None, metadata={"help": "Passages tried per question, best first, until --top_k of them parsed (a "
                                        "failure is replaced by the next candidate; the original: 13 for 3). "
                                        "Default: --top_k (no replacement)."})
    num_qa: int = field(default=3, metadata={"help": "QA pairs asked for per passage (the original: 3)."})
    max_attempts: int = field(default=5, metadata={"help": "Times a passage's QA prompt is asked before the "
                                                           "passage is skipped (parse failures retry)."})
    augment_model_name: str | None = field(default=None, metadata={"help": "Prefix of the output fields (default: "
                                                                           "the model path's basename, lower-case)."})
    max_samples: int | None = field(default=None, metadata={"help": "Augment only the first N records."})
    keep_skipped: bool = field(default=False, metadata={"help": "Keep passages whose augmentation never parsed "
                                                                "(without an 'augment' entry: encoding trains them "
                                                                "on the passage alone) instead of dropping them as "
                                                                "the original does."})
    # Generation: the original's sampling (HF's default top-k 50), which is what makes a retry differ.
    max_new_tokens: int = field(default=512, metadata={"help": "Tokens generated per rewrite / QA reply."})
    do_sample: bool = field(default=True, metadata={"help": "Sample the replies (greedy retries would repeat)."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature."})

    def __post_init__(self) -> None:
        if not self.input_file:
            raise UserError("--input_file is required: the questions (PRAG records or a .txt) to augment.")
        for name in ("top_k", "num_qa", "max_attempts", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        self.candidates = self.top_k if self.candidates is None else self.candidates
        if self.candidates < self.top_k:
            raise UserError(f"--candidates ({self.candidates}) must be at least --top_k ({self.top_k}): the passages "
                            f"tried per question include the kept ones.")
        if self.keep_skipped and self.candidates > self.top_k:
            raise UserError("--keep_skipped keeps a failed passage in place, --candidates replaces it by the next "
                            "one; pass one of them.")


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

    from .core.stage import resolved_config, save_config
    from .core.distributed import zero_stage
    from .core.arguments import FinetuningArguments, ModelArguments, RunArguments, parse_args
    from .core.loader import check_model_args, get_compute_dtype, load_model, load_tokenizer
    from .core.distributed import local_device
    from .prag_eval import check_output_dir, gather_shares, rank_share

    # 1. arguments and checks
    model_args, aug_args, training_args, run_args = parse_args(
        [ModelArguments, AugmentArguments, TrainingArguments, RunArguments], argv, STAGE)
    finetuning_args = FinetuningArguments()  # inference only: adapters given with the model are merged
    check_model_args(model_args, finetuning_args, zero_stage(training_args.deepspeed))
    if zero_stage(training_args.deepspeed) == 3:
        raise UserError(f"--deepspeed {training_args.deepspeed} is ZeRO-3, which augment cannot use: it generates data "
                        f"parallel (each rank holds the whole model); use a ZeRO-0/2 config such as "
                        f"ds_configs/zero2.json.")
    rank, world = training_args.process_index, training_args.world_size  # sets up the ranks under DeepSpeed
    out = check_output_dir(training_args.output_dir, run_args.overwrite_output_dir)
    config = resolved_config(STAGE, model_args, aug_args, training_args, run_args)
    save_config(str(out), config)
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
    model = load_model(tokenizer, model_args, finetuning_args, is_trainable=False,
                       compute_dtype=get_compute_dtype(training_args.bf16, training_args.fp16))
    if model_args.quantization_bit is None:
        model.to(local_device())
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
