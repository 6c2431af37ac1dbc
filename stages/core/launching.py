"""The Python side of `launch/<stage>.sh` (each script is valid bash and valid Python).

`deepspeed launch/sft.sh cfg.yaml --key v` runs `python -u launch/sft.sh --local_rank=N cfg.yaml
--key v` on every rank. Here the launcher's `--local_rank` flag is dropped (LOCAL_RANK is in
the environment, where transformers reads it) and a DeepSpeed config is added when the run
names none: `$DS_CONFIG`, else ds_configs/zero2.json.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
DEFAULT_DS_CONFIG = ROOT / "ds_configs" / "zero2.json"


def _names_deepspeed(argv: list[str]) -> bool:
    if any(arg == "--deepspeed" or arg.startswith("--deepspeed=") for arg in argv):
        return True
    if argv and not argv[0].startswith("-"):
        from .errors import UserError
        from .arguments import read_config_file

        try:
            return "deepspeed" in read_config_file(argv[0])
        except UserError:
            return False  # the stage itself reports the bad file
    return False


def stage_argv(argv: list[str]) -> list[str]:
    """Launcher argv -> the stage's argv (no --local_rank, a DeepSpeed config always named)."""
    argv = [arg for arg in argv if not arg.startswith("--local_rank")]
    if os.environ.get("DS_CONFIG"):
        return argv + ["--deepspeed", os.environ["DS_CONFIG"]]
    if not _names_deepspeed(argv):
        return argv + ["--deepspeed", str(DEFAULT_DS_CONFIG)]
    return argv


def launched_main(stage: str) -> None:
    main = importlib.import_module(f"stages.{stage}").main
    main(stage_argv(sys.argv[1:]))
