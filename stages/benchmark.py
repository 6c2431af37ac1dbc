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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .core.errors import UserError, main_guard

logger = logging.getLogger(__name__)

STAGE = "benchmark"


@dataclass
class BenchmarkArguments:
    dataset: Literal["2wikimultihopqa", "hotpotqa", "popqa", "complexwebquestions"] | None = field(
        default=None, metadata={"help": "Which benchmark --data_dir holds."})
    data_dir: str | None = field(default=None, metadata={"help": "Folder with the benchmark's published files."})
    output_dir: str | None = field(default=None, metadata={"help": "Folder the record files are written into."})
    per_type: int = field(default=300, metadata={"help": "Questions per sub-type file and in total.json (the "
                                                         "original: 300)."})
    skip: int = field(default=0, metadata={"help": "Questions left out at the start of each sub-type and of the "
                                                   "total (the original's projector data: 300)."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Write into an output_dir that already "
                                                                        "holds files."})

    def __post_init__(self) -> None:
        for name in ("dataset", "data_dir", "output_dir"):
            if not getattr(self, name):
                raise UserError(f"--{name} is required; run `python -m stages.benchmark --help`.")
        if self.per_type < 1 or self.skip < 0:
            raise UserError(f"--per_type must be at least 1 and --skip at least 0, got {self.per_type} and "
                            f"{self.skip}.")


def run_benchmark(argv: list[str] | None = None) -> None:
    from dyprag.benchmarks import LOADERS, split_by_type
    from dyprag.records import RecordError, save_records

    from .core.arguments import parse_args
    from .prag_eval import check_output_dir

    (args,) = parse_args([BenchmarkArguments], argv, STAGE)
    folder = Path(args.data_dir)
    if not folder.is_dir():
        raise UserError(f"--data_dir {folder} is not a folder; point it at the folder of the {args.dataset} files.")
    out = check_output_dir(args.output_dir, args.overwrite_output_dir)
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
