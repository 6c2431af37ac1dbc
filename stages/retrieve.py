"""retrieve: build a BM25 index over a passage corpus, and/or fill question records with top-k passages.

    python -m stages.retrieve --corpus psgs_w100.tsv --index_dir IDX                 # build
    python -m stages.retrieve --index_dir IDX --input_file q.json --output_file r.json --top_k 3

`--corpus` is a .jsonl (id/title/text) or a DPR-style .tsv; the index is saved to
`--index_dir` (see dyprag.retrieval). With `--input_file` (question records, a JSON list or
JSON lines with `question`, or a .txt with one question per line), every record gets the
top-k passages: `passages` (texts, what the PRAG format carries), `passage_ids` (corpus ids)
and `passage_scores`, written as PRAG records to `--output_file`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .core.dyprag_arguments import RetrieveArguments
from .core.errors import UserError, main_guard

logger = logging.getLogger(__name__)


def load_questions(path: str) -> list[dict[str, Any]]:
    from dyprag.records import RecordError, load_records

    try:
        return load_records(path)
    except RecordError as err:
        raise UserError(f"--input_file: {err}") from None


def attach_passages(records: list[dict[str, Any]], index, top_k: int) -> list[dict[str, Any]]:
    """Records with their top-k passages (texts, corpus ids, scores) from `index`."""
    hits = index.search([record["question"] for record in records], top_k, show_progress=True)
    return [{**record, "passages": [h.text for h in row], "passage_ids": [h.id for h in row],
             "passage_scores": [h.score for h in row]} for record, row in zip(records, hits)]


def run_retrieve(argv: list[str] | None = None) -> None:
    from dyprag.records import save_records
    from dyprag.retrieval import BM25Index, CorpusError

    from .core.arguments import parse_args

    (args,) = parse_args([RetrieveArguments], argv, "retrieve")
    index_dir = Path(args.index_dir)
    try:
        # 1. the index: build from --corpus (refusing to replace one silently), else load
        if args.corpus:
            if index_dir.is_dir() and any(index_dir.iterdir()) and not args.overwrite_output_dir:
                raise UserError(f"--index_dir {index_dir} is not empty; pick a new folder or add "
                                f"--overwrite_output_dir to rebuild it.")
            index = BM25Index.from_corpus_file(args.corpus, k1=args.k1, b=args.b)
            index.save(index_dir)
            logger.info("indexed %d passages of %s into %s", len(index), args.corpus, index_dir)
        else:
            index = BM25Index.load(index_dir, mmap=args.mmap)
        if not args.input_file:
            return

        # 2. retrieval for the question records
        output = Path(args.output_file)
        if output.exists() and not args.overwrite_output_dir:
            raise UserError(f"--output_file {output} exists; pick another name or add --overwrite_output_dir.")
        records = attach_passages(load_questions(args.input_file), index, args.top_k)
    except CorpusError as err:
        raise UserError(str(err)) from None
    save_records(output, records)
    logger.info("wrote %d records with top-%d passages to %s", len(records), args.top_k, output)
    print(json.dumps({"records": len(records), "top_k": args.top_k, "output_file": str(output)}))


main = main_guard(run_retrieve)

if __name__ == "__main__":
    main()
