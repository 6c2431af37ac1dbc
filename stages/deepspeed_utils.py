"""Reading DeepSpeed configs (the HF integration fills their "auto" values itself)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import UserError


def read_ds_config(config: str | dict[str, Any] | None) -> dict[str, Any] | None:
    """The `--deepspeed` value as a dict: a JSON file path or an already parsed dict."""
    if config is None or isinstance(config, dict):
        return config
    path = Path(config)
    if not path.is_file():
        raise UserError(f"--deepspeed {config} does not exist; use one of ds_configs/*.json.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"--deepspeed {config} is not valid JSON (line {err.lineno}: {err.msg}).") from None


def zero_stage(config: str | dict[str, Any] | None) -> int | None:
    """The ZeRO stage of a DeepSpeed config, or None without DeepSpeed."""
    values = read_ds_config(config)
    if values is None:
        return None
    return int(values.get("zero_optimization", {}).get("stage", 0))
