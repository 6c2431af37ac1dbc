"""benchmark: a public QA benchmark's published files as question records, one file per sub-type, as the original.

    python -m stages.benchmark --dataset hotpotqa --data_dir data/hotpotqa --output_dir runs/hotpotqa
    python -m stages.augment --model_name_or_path M --input_file runs/hotpotqa/bridge.json --index_dir IDX \\
        --candidates 13 --output_dir runs/hotpotqa/bridge_aug
    python -m stages.prag_eval ... --data_file runs/hotpotqa/bridge_aug/augmented.json   # + a per-type table

--dataset: 2wikimultihopqa (dev.json + id_aliases.json), hotpotqa (hotpot_dev_distractor_v1.json),
popqa (popQA.tsv) or complexwebquestions (ComplexWebQuestions_dev.json), read from --data_dir
(`dyprag.benchmarks`). OUT/<type>.json holds the first --per_type questions of each sub-type
(2WikiMultihopQA: comparison, inference, compositional, bridge_comparison; HotpotQA: bridge,
comparison) and OUT/total.json the first --per_type of the whole file, which is what the original
evaluates (300 each). Records carry `type`, so prag_eval over any of them also reports EM/F1 per
sub-type. `--skip` N starts after the first N questions of each (the original trains its
projector on questions 300-500: `--skip 300 --per_type 200`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .core.dyprag_arguments import BenchmarkArguments
from .core.errors import UserError, main_guard

logger = logging.getLogger(__name__)

STAGE = "benchmark"


def run_benchmark(argv: list[str] | None = None) -> None:
    from dyprag.benchmarks import LOADERS, split_by_type
    from dyprag.records import RecordError, save_records

    from .core.arguments import parse_args
    from .core.stage import prepare_output_dir

    (args,) = parse_args([BenchmarkArguments], argv, STAGE)
    folder = Path(args.data_dir)
    if not folder.is_dir():
        raise UserError(f"--data_dir {folder} is not a folder; point it at the folder of the {args.dataset} files.")
    out = prepare_output_dir(args.output_dir, overwrite=args.overwrite_output_dir)
    try:
        records = LOADERS[args.dataset](folder)
    except RecordError as err:
        raise UserError(f"--data_dir: {err}") from None
    counts = {}
    for kind, rows in split_by_type(records, args.skip + args.per_type).items():
        kept = rows[args.skip:]
        save_records(out / f"{kind}.json", kept)
        counts[kind] = len(kept)
    (out / "benchmark_summary.json").write_text(json.dumps({"dataset": args.dataset, "questions": len(records),
                                                            "files": counts}, indent=2) + "\n", encoding="utf-8")
    logger.info("%s: %d questions; wrote %s into %s", args.dataset, len(records),
                ", ".join(f"{kind}.json ({n})" for kind, n in counts.items()), out)


main = main_guard(run_benchmark)

if __name__ == "__main__":
    main()
