"""The QA benchmarks PRAG and DyPRAG evaluate on, read from their published files, as question records.

Each loader reads a benchmark's folder in the layout its authors publish (the file names the
original's `src/augment.py` reads) and returns records {test_id, qid, question, answer, type,
...}: `answer` is every accepted alias, `type` the benchmark's sub-type ("total" where it has
none). Fields a loader does not use are ignored.

- 2wikimultihopqa: dev.json (`_id`, `type`: comparison / inference / compositional /
  bridge_comparison, `question`, `answer`, `answer_id`) and id_aliases.json (JSON lines
  `Q_id`, `aliases`): the answer's aliases where it has an entity id;
- hotpotqa: hotpot_dev_distractor_v1.json (`_id`, `type`: bridge / comparison, `question`,
  `answer`, often "yes" / "no");
- popqa: popQA.tsv (`question`, `obj`, `o_aliases` as a Python list literal, `s_pop`: kept on
  the record, the subject's popularity);
- complexwebquestions: ComplexWebQuestions_dev.json (`ID`, `question`, `answers`: [{answer,
  aliases}]).

`split_by_type` takes the first N questions of each sub-type, and the original's "total": the
first N of the whole file.
"""

from __future__ import annotations

import ast
import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .records import RecordError

TOTAL = "total"


def _require(path: Path) -> Path:
    if not path.is_file():
        raise RecordError(f"{path} does not exist; the folder must hold the benchmark's published {path.name}.")
    return path


def _read_json(path: Path) -> Any:
    _require(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RecordError(f"{path} is not valid UTF-8 JSON ({err}); use the file as published.") from None


def _field(row: dict[str, Any], key: str, index: int, path: Path) -> Any:
    if key not in row:
        raise RecordError(f"question {index} of {path} has no {key!r} field; is this the benchmark's published file?")
    return row[key]


def _aliases(*groups: Any) -> list[str]:
    """The distinct non-empty strings of the groups, first seen first."""
    out: list[str] = []
    for group in groups:
        for alias in [group] if isinstance(group, str) else group or []:
            if isinstance(alias, str) and alias.strip() and alias not in out:
                out.append(alias)
    return out


def load_2wikimultihopqa(folder: Path) -> list[dict[str, Any]]:
    path = folder / "dev.json"
    rows = _read_json(path)
    aliases = {}
    for line in _require(folder / "id_aliases.json").read_text(encoding="utf-8").splitlines():
        if line.strip():
            entry = json.loads(line)
            aliases[entry["Q_id"]] = entry.get("aliases") or []
    return [{"test_id": i, "qid": _field(row, "_id", i, path), "question": _field(row, "question", i, path),
             "answer": _aliases(_field(row, "answer", i, path), aliases.get(row.get("answer_id"), [])),
             "type": _field(row, "type", i, path)} for i, row in enumerate(rows)]


def load_hotpotqa(folder: Path) -> list[dict[str, Any]]:
    path = folder / "hotpot_dev_distractor_v1.json"
    return [{"test_id": i, "qid": _field(row, "_id", i, path), "question": _field(row, "question", i, path),
             "answer": _aliases(_field(row, "answer", i, path)), "type": _field(row, "type", i, path)}
            for i, row in enumerate(_read_json(path))]


def load_popqa(folder: Path) -> list[dict[str, Any]]:
    path = _require(folder / "popQA.tsv")
    with open(path, encoding="utf-8", newline="") as file:
        rows = list(csv.DictReader(file, delimiter="\t"))
    records = []
    for i, row in enumerate(rows):
        try:
            aliases = ast.literal_eval(_field(row, "o_aliases", i, path) or "[]")
        except (ValueError, SyntaxError):
            raise RecordError(f"question {i} of {path}: o_aliases {row['o_aliases']!r} is not a list "
                              f"literal.") from None
        record = {"test_id": i, "qid": row.get("id", str(i)), "question": _field(row, "question", i, path),
                  "answer": _aliases(_field(row, "obj", i, path), aliases), "type": TOTAL}
        if row.get("s_pop"):
            record["s_pop"] = int(float(row["s_pop"]))
        records.append(record)
    return records


def load_complexwebquestions(folder: Path) -> list[dict[str, Any]]:
    path = folder / "ComplexWebQuestions_dev.json"
    records = []
    for i, row in enumerate(_read_json(path)):
        answers = _field(row, "answers", i, path)
        records.append({"test_id": i, "qid": row.get("ID", str(i)), "question": _field(row, "question", i, path),
                        "answer": _aliases(*([a.get("answer")] + list(a.get("aliases") or []) for a in answers)),
                        "type": TOTAL})
    return records


LOADERS: dict[str, Callable[[Path], list[dict[str, Any]]]] = {
    "2wikimultihopqa": load_2wikimultihopqa, "hotpotqa": load_hotpotqa, "popqa": load_popqa,
    "complexwebquestions": load_complexwebquestions}


def split_by_type(records: list[dict[str, Any]], per_type: int) -> dict[str, list[dict[str, Any]]]:
    """The first `per_type` questions of each sub-type, and "total": the first `per_type` of all (the original's)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        if record["type"] != TOTAL:
            groups.setdefault(record["type"], []).append(record)
    return {**{kind: rows[:per_type] for kind, rows in groups.items()}, TOTAL: records[:per_type]}
