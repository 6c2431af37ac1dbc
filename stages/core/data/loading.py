"""Load registered datasets and align them to one common format.

Every dataset, alpaca or sharegpt, plain or ranking, becomes rows of
    _prompt:   list of {"role", "content"} turns before the answer (history included)
    _response: [answer] for sft, [chosen, rejected] for ranking, [] for plain text
    _system:   system prompt ("" when none)
so that each stage's preprocessing is written once.
"""

from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from .registry import DatasetAttr, check_sha1, get_dataset_attrs

if TYPE_CHECKING:
    from datasets import Dataset, IterableDataset

    from ..arguments import DataArguments

logger = logging.getLogger(__name__)

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text",
                 ".arrow": "arrow"}
ALIGNED_COLUMNS = ("_prompt", "_response", "_system")


def _data_files(attr: DatasetAttr) -> tuple[str, list[str]]:
    path = Path(attr.path)
    if path.is_dir():
        files = sorted(str(f) for f in path.iterdir() if f.is_file() and not f.name.startswith("."))
        if not files:
            raise UserError(f"dataset {attr.name!r}: folder {path} holds no files; put data files in it.")
    elif path.is_file():
        files = [str(path)]
    else:
        raise UserError(f"dataset {attr.name!r}: file {path} does not exist; fix file_name in dataset_info.json "
                        f"or --dataset_dir.")
    suffixes = {Path(f).suffix.lower() for f in files}
    builders = {FILE_BUILDERS.get(suffix) for suffix in suffixes}
    if len(builders) != 1 or None in builders:  # .json and .jsonl mix: both are read by the json builder
        raise UserError(f"dataset {attr.name!r}: {path} must hold files of one type among "
                        f"{', '.join(FILE_BUILDERS)}; found {', '.join(sorted(suffixes))}.")
    return builders.pop(), files


def check_datasets(names: list[str], dataset_dir: str) -> None:
    """Resolve `names` and find their local files, so registry mistakes fail at argument validation."""
    for attr in get_dataset_attrs(names, dataset_dir):
        if attr.load_from == "file":
            _data_files(attr)


def _explain_bad_file(files: list[str], builder: str) -> str | None:
    """Name the first text file that is not UTF-8, or the first malformed JSON file/line, so the user knows where to
    look."""
    for file in files:
        try:
            text = Path(file).read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            return f"{file} is not UTF-8 text (byte {err.start}); save it as UTF-8, uncompressed"
        if builder != "json":
            continue
        if not file.endswith(".jsonl"):
            try:
                json.loads(text)
                continue
            except json.JSONDecodeError as err:
                if err.msg != "Extra data":  # else: JSON Lines in a .json file, read line by line
                    return f"{file} line {err.lineno} is not valid JSON ({err.msg})"
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as err:
                    return f"{file} line {number} is not valid JSON ({err.msg})"
    return None


def load_raw(attr: DatasetAttr, data_args: DataArguments, seed: int) -> Dataset | IterableDataset:
    """Load one registered dataset as it is on disk (columns not yet aligned)."""
    from datasets import load_dataset

    if attr.load_from == "file":
        check_sha1(attr)
        builder, files = _data_files(attr)
        kwargs: dict[str, Any] = {"path": builder, "data_files": files}
    elif attr.load_from == "script":
        if attr.path.endswith(".py"):
            raise UserError(f"dataset {attr.name!r}: loading scripts ({attr.path}) are not supported by datasets>=4; "
                            f"point script_url at a folder of data files instead.")
        kwargs, files = {"path": attr.path, "name": attr.subset}, []
    else:
        kwargs, files = {"path": attr.path, "name": attr.subset}, []
    try:
        dataset = load_dataset(**kwargs, split=attr.split, streaming=data_args.streaming)
    except Exception as err:  # datasets wraps parse errors in several exception types
        text_files = files if kwargs["path"] in ("json", "csv", "text") else []
        reason = _explain_bad_file(text_files, kwargs["path"]) or str(err).strip().splitlines()[0]
        raise UserError(f"dataset {attr.name!r} could not be loaded: {reason}; fix the data or its entry.") from None
    limit = data_args.max_samples or attr.num_samples
    if limit is not None:  # the first rows, streamed or not (shuffling first would pick others)
        dataset = dataset.take(limit) if data_args.streaming else dataset.select(range(min(limit, len(dataset))))
    if data_args.streaming:
        dataset = dataset.shuffle(seed=seed, buffer_size=data_args.buffer_size)
    return dataset


def _message(role: str, content: Any) -> dict[str, str]:
    return {"role": role, "content": "" if content is None else str(content)}


def _convert_alpaca(example: dict[str, Any], attr: DatasetAttr) -> dict[str, Any]:
    col = attr.columns
    prompt = []
    for old_query, old_response in (example[col["history"]] or []) if col["history"] else []:
        prompt += [_message("user", old_query), _message("assistant", old_response)]
    query = "\n".join(str(example[c]) for c in (col["prompt"], col["query"]) if c and example.get(c))
    prompt.append(_message("user", query))
    if attr.ranking:
        response = [_message("assistant", _as_text(example[col["chosen"]])),
                    _message("assistant", _as_text(example[col["rejected"]]))]
    elif col.get("response") and example.get(col["response"]) is not None:
        response = [_message("assistant", example[col["response"]])]
    else:
        response = []
    system = example[col["system"]] if col["system"] else ""
    return {"_prompt": prompt, "_response": response, "_system": system or ""}


def _as_text(value: Any) -> str:
    """Ranking answers are strings (alpaca) or one message dict (sharegpt)."""
    return value.get("value", value.get("content", "")) if isinstance(value, dict) else str(value)


def _convert_sharegpt(example: dict[str, Any], attr: DatasetAttr) -> dict[str, Any]:
    col, tags = attr.columns, attr.tags
    roles = {tags["user_tag"]: "user", tags["observation_tag"]: "user",
             tags["assistant_tag"]: "assistant", tags["function_tag"]: "assistant"}
    messages = list(example[col["messages"]] or [])
    system = example[col["system"]] if col["system"] else ""
    if messages and messages[0][tags["role_tag"]] == tags["system_tag"]:
        system, messages = messages[0][tags["content_tag"]], messages[1:]
    turns = []
    for index, message in enumerate(messages):
        role = roles.get(message[tags["role_tag"]])
        expected = "user" if index % 2 == 0 else "assistant"
        if role != expected:  # broken turn order: the row is dropped (and counted) later
            return {"_prompt": [], "_response": [], "_system": ""}
        turns.append(_message(role, message[tags["content_tag"]]))
    if attr.ranking:
        if len(turns) % 2 != 1:
            return {"_prompt": [], "_response": [], "_system": ""}
        response = [_message("assistant", _as_text(example[col["chosen"]])),
                    _message("assistant", _as_text(example[col["rejected"]]))]
        return {"_prompt": turns, "_response": response, "_system": system or ""}
    if len(turns) % 2 != 0:
        return {"_prompt": [], "_response": [], "_system": ""}
    return {"_prompt": turns[:-1], "_response": turns[-1:], "_system": system or ""}


def _required_columns(attr: DatasetAttr) -> list[str]:
    col = attr.columns
    if attr.formatting == "sharegpt":
        needed = [col["messages"]]
    else:
        needed = [col["prompt"]]
    if attr.ranking:
        needed += [col["chosen"], col["rejected"]]
    return [c for c in needed if c] + [c for k, c in col.items() if c and k in ("history", "system")]


def align_dataset(dataset: Dataset | IterableDataset, attr: DatasetAttr) -> Dataset | IterableDataset:
    """Map one raw dataset onto the common `_prompt/_response/_system` format."""
    present = dataset.column_names
    if present is not None:
        missing = [c for c in _required_columns(attr) if c not in present]
        if missing:
            raise UserError(f"dataset {attr.name!r} has no column(s) {', '.join(missing)} "
                            f"(it has: {', '.join(present)}); set \"columns\" in its dataset_info.json entry.")
    convert = _convert_alpaca if attr.formatting == "alpaca" else _convert_sharegpt
    return dataset.map(partial(convert, attr=attr), remove_columns=present)


def load_aligned(names: list[str], data_args: DataArguments, seed: int, *, ranking: bool | None = None):
    """Load, align and mix the named datasets; `ranking` checks the kind a stage needs."""
    from datasets import concatenate_datasets, interleave_datasets

    attrs = get_dataset_attrs(names, data_args.dataset_dir)
    if ranking is not None:
        for attr in attrs:
            if attr.ranking != ranking:
                need = "pairwise (\"ranking\": true)" if ranking else "non-pairwise"
                raise UserError(f"dataset {attr.name!r} is {'pairwise' if attr.ranking else 'not pairwise'}; "
                                f"this stage needs {need} data. Pick another --dataset.")
    datasets = [align_dataset(load_raw(attr, data_args, seed), attr) for attr in attrs]
    if len(datasets) == 1:
        return datasets[0]
    if data_args.mix_strategy == "concat":
        return concatenate_datasets(datasets)
    probs = [float(p) for p in data_args.interleave_probs.split(",")] if data_args.interleave_probs else None
    stopping = "first_exhausted" if data_args.mix_strategy == "interleave_under" else "all_exhausted"
    return interleave_datasets(datasets, probabilities=probs, seed=seed, stopping_strategy=stopping)
