"""The dataset registry: `dataset_info.json`, in LLaMA-Factory's format.

An entry maps a name to a local file or folder (`file_name`), a hub dataset (`hf_hub_url`)
or a local loader folder (`script_url`), plus how its columns map onto our fields:

    "alpaca_en_demo": {"file_name": "alpaca_en_demo.json"}
    "dpo_en_demo": {"file_name": "dpo_en_demo.json", "ranking": true, "formatting": "sharegpt",
                    "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}}

Entries copied from LLaMA-Factory work unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import UserError

logger = logging.getLogger(__name__)

# Our field -> default column name, per formatting (LLaMA-Factory's defaults).
ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "history": None,
                  "system": None, "chosen": None, "rejected": None, "tools": None}
SHAREGPT_COLUMNS = {"messages": "conversations", "system": None, "tools": None, "chosen": None, "rejected": None}
SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}


@dataclass
class DatasetAttr:
    """One resolved `dataset_info.json` entry."""

    name: str
    load_from: Literal["file", "hub", "script"]
    path: str
    formatting: Literal["alpaca", "sharegpt"] = "alpaca"
    ranking: bool = False
    split: str = "train"
    subset: str | None = None
    file_sha1: str | None = None
    num_samples: int | None = None
    columns: dict[str, str | None] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


def read_dataset_info(dataset_dir: str) -> dict[str, Any]:
    info_file = Path(dataset_dir) / "dataset_info.json"
    if not info_file.is_file():
        raise UserError(f"{info_file} does not exist; set --dataset_dir to the folder that holds dataset_info.json.")
    try:
        info = json.loads(info_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{info_file} is not valid JSON (line {err.lineno}: {err.msg}); fix the file.") from None
    if not isinstance(info, dict):
        raise UserError(f"{info_file} must map dataset names to entries.")
    return info


def get_dataset_attrs(names: list[str], dataset_dir: str) -> list[DatasetAttr]:
    """Resolve dataset names against `dataset_dir/dataset_info.json`."""
    if not names:
        return []
    info = read_dataset_info(dataset_dir)
    attrs = []
    for name in names:
        if name not in info:
            known = ", ".join(sorted(info)) or "none"
            raise UserError(f"dataset {name!r} is not in {Path(dataset_dir) / 'dataset_info.json'} "
                            f"(known: {known}); fix --dataset or add an entry.")
        attrs.append(_parse_entry(name, info[name], dataset_dir))
    return attrs


def _parse_entry(name: str, entry: dict[str, Any], dataset_dir: str) -> DatasetAttr:
    if "file_name" in entry:
        load_from, path = "file", str(Path(dataset_dir) / entry["file_name"])
    elif "hf_hub_url" in entry:
        load_from, path = "hub", entry["hf_hub_url"]
    elif "script_url" in entry:
        load_from, path = "script", str(Path(dataset_dir) / entry["script_url"])
    else:
        raise UserError(f"dataset {name!r} in dataset_info.json needs one of file_name, hf_hub_url, script_url.")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt"):
        raise UserError(f"dataset {name!r}: formatting {formatting!r} is unknown; use alpaca or sharegpt.")
    defaults = ALPACA_COLUMNS if formatting == "alpaca" else SHAREGPT_COLUMNS
    columns = {**defaults, **entry.get("columns", {})}
    tags = {**SHAREGPT_TAGS, **entry.get("tags", {})} if formatting == "sharegpt" else {}
    return DatasetAttr(
        name=name, load_from=load_from, path=path, formatting=formatting, ranking=bool(entry.get("ranking", False)),
        split=entry.get("split", "train"), subset=entry.get("subset"), file_sha1=entry.get("file_sha1"),
        num_samples=entry.get("num_samples"), columns=columns, tags=tags,
    )


def check_sha1(attr: DatasetAttr) -> None:
    """Warn (never fail) when a file's sha1 differs from its registry entry."""
    path = Path(attr.path)
    if attr.file_sha1 is None or not path.is_file():
        return
    digest = hashlib.sha1(path.read_bytes()).hexdigest()
    if digest != attr.file_sha1:
        logger.warning("dataset %s: sha1 of %s is %s, dataset_info.json says %s; the file may have changed.",
                       attr.name, path, digest, attr.file_sha1)
