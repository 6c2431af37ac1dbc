"""The public PRAG/DyPRAG augmented record format, read and written unchanged.

A file is a JSON list (JSON lines also read) of records

    {"test_id": 0, "question": "...", "answer": ["alias", ...], "passages": ["...", ...],
     "augment": [{"pid": 0, "passage": "...", "<model>_rewrite": "...",
                  "<model>_qa": [{"question": "...", "answer": "...", "full_answer": "..."}]}, ...]}

`<model>` is the augmentation model's name (the basename of its path, lower-case, e.g.
`llama3.2-1b-instruct`); it is detected from the keys, never assumed. Extra fields (the
embedded world's `passage_ids`, `split`, the original's `..._translate`) are kept as they are.

Passage ids (the keys of the LoRA bank): "<test_id>_<pid>" for the passages of a record,
pid being the passage's position in `passages` (the original's adapter folders
data_<test_id>/passage_<pid>).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REWRITE_SUFFIX = "_rewrite"
QA_SUFFIX = "_qa"


class RecordError(ValueError):
    """A record file that does not follow the format; the message names the file and the fix."""


def augment_model_name(model_name_or_path: str) -> str:
    """The name that prefixes the augmentation fields: the model path's basename, lower-case."""
    return Path(str(model_name_or_path).rstrip("/\\")).name.lower()


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Read question records and check the fields every use needs.

    A JSON list or JSON lines of records, or a plain .txt question file (one question a line,
    no gold answers). Each record needs a string `question`; `answer` may be a string or a
    list of strings (a string becomes a one-alias list); `test_id` defaults to the position.
    """
    file = Path(path)
    if not file.is_file():
        raise RecordError(f"record file {path} does not exist; pass a JSON list of PRAG records or a .txt of "
                          f"questions.")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise RecordError(f"record file {path} is not UTF-8 text (byte {err.start}); pass the JSON / .txt file "
                          f"itself, saved as UTF-8.") from None
    if file.suffix == ".txt":
        questions = [line.strip() for line in text.splitlines() if line.strip()]
        return [{"test_id": i, "question": q, "answer": []} for i, q in enumerate(questions)]
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise RecordError(f"record file {path} line {err.lineno} is not valid JSON ({err.msg}); fix it or "
                              f"regenerate the file.") from None
    else:  # JSON lines: the error names the line of the file, not of the record
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise RecordError(f"record file {path} line {number} is not valid JSON ({err.msg}); a JSON lines "
                                  f"file holds one record per line.") from None
    for index, record in enumerate(records):
        if not isinstance(record, dict) or not isinstance(record.get("question"), str):
            raise RecordError(f"record {index} of {path} has no string 'question'; every record needs one.")
        answer = record.get("answer", [])
        if isinstance(answer, str):
            record["answer"] = [answer]
        elif not isinstance(answer, list) or not all(isinstance(a, str) for a in answer):
            raise RecordError(f"record {index} of {path}: 'answer' must be a string or a list of strings.")
        record.setdefault("test_id", index)
    return records



def load_split(path: str | Path, split: str | None = None, max_samples: int | None = None) -> list[dict[str, Any]]:
    """`load_records`, only the records whose 'split' field is `split` (every record without one), then the first
    `max_samples`; a file that leaves none is a `RecordError`."""
    records = load_records(path)
    if split is not None:
        records = [r for r in records if r.get("split") == split]
        if not records:
            raise RecordError(f"{path} holds no record with split {split!r}; pick a --split its records have, or "
                              f"drop the flag.")
    return records[:max_samples]


def save_records(path: str | Path, records: Sequence[dict[str, Any]]) -> None:
    """Write records as a JSON list, one record per line (readable, diffable), atomically."""
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(file.name + ".tmp")
    body = ",\n".join(json.dumps(record, ensure_ascii=False) for record in records)
    tmp.write_text("[\n" + body + "\n]\n" if records else "[]\n", encoding="utf-8")
    tmp.replace(file)


def detect_augment_model(records: Sequence[dict[str, Any]]) -> str:
    """The `<model>` of the `<model>_rewrite` / `<model>_qa` fields; exactly one must be present."""
    names: set[str] = set()
    for record in records:
        for entry in record.get("augment") or []:
            rewrites = {k[: -len(REWRITE_SUFFIX)] for k in entry if k.endswith(REWRITE_SUFFIX)}
            names |= {name for name in rewrites if f"{name}{QA_SUFFIX}" in entry}
    if len(names) != 1:
        found = ", ".join(sorted(names)) or "none"
        raise RecordError(f"expected the augmentation fields of exactly one model (<model>_rewrite and <model>_qa in "
                          f"'augment'), found {found}; augment the records first (python -m stages.augment) or "
                          f"name the model to use.")
    return names.pop()


def passage_id(test_id: Any, pid: int) -> str:
    """The bank key of passage `pid` of record `test_id`."""
    return f"{test_id}_{pid}"


def record_passage_ids(record: dict[str, Any], top_k: int | None = None) -> list[str]:
    """Bank keys of the record's first `top_k` passages (all when None)."""
    count = len(record.get("passages") or [])
    if top_k is not None:
        count = min(count, top_k)
    return [passage_id(record["test_id"], pid) for pid in range(count)]


@dataclass
class Passage:
    """One passage of a record: its bank key, text, and the augmentation (rewrite, QA pairs) when it has one."""

    id: str
    text: str
    rewrite: str | None
    qas: list[dict[str, str]]


def collect_passages(records: Sequence[dict[str, Any]], augment_name: str | None) -> list[Passage]:
    """Every passage of every record, with its `<augment_name>` rewrite and QA pairs when the record has them."""
    passages = []
    for record in records:
        augments = {entry.get("pid", pid): entry for pid, entry in enumerate(record.get("augment") or [])}
        texts = list(record.get("passages") or [])
        for pid in sorted(set(range(len(texts))) | set(augments)):
            entry = augments.get(pid, {})
            text = entry.get("passage") or (texts[pid] if pid < len(texts) else None)
            if not text:
                continue
            passages.append(Passage(passage_id(record["test_id"], pid), text,
                                    entry.get(f"{augment_name}{REWRITE_SUFFIX}") if augment_name else None,
                                    list(entry.get(f"{augment_name}{QA_SUFFIX}") or []) if augment_name else []))
    return passages
