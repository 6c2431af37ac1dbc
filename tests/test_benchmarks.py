"""stages.benchmark: the four benchmarks' published files as records per sub-type; prag_eval's per-sub-type table.

The fixtures are small files in each benchmark's published layout, with the fields a loader uses
and some it does not.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from helpers import run_stage

from dyprag.inference import results_by_type, results_table, types_markdown
from stages.benchmark import run_benchmark
from stages.core.errors import UserError

WIKI_TYPES = ["comparison", "inference", "compositional", "bridge_comparison"]


def write_2wiki(folder: Path) -> None:
    rows = [{"_id": f"w{i}", "type": WIKI_TYPES[i % 4], "question": f"Wiki question {i}?", "answer": f"Answer {i}",
             "answer_id": f"Q{i}" if i % 2 else "", "context": [["Title", ["A sentence."]]],
             "supporting_facts": [["Title", 0]], "evidences": [["Title", "rel", "obj"]]} for i in range(10)]
    (folder / "dev.json").write_text(json.dumps(rows))
    (folder / "id_aliases.json").write_text("\n".join(json.dumps({"Q_id": f"Q{i}", "aliases": [f"Alias {i}"],
                                                                  "demonyms": []}) for i in range(1, 10, 2)))


def write_hotpotqa(folder: Path) -> None:
    rows = [{"_id": f"h{i}", "type": "comparison" if i % 3 == 0 else "bridge", "level": "hard",
             "question": f"Hotpot question {i}?", "answer": "yes" if i % 3 == 0 else f"Entity {i}",
             "supporting_facts": [["T", 0]], "context": [["T", ["S."]]]} for i in range(7)]
    (folder / "hotpot_dev_distractor_v1.json").write_text(json.dumps(rows))


def write_popqa(folder: Path) -> None:
    with open(folder / "popQA.tsv", "w", newline="") as file:
        writer = csv.writer(file, delimiter="\t")
        writer.writerow(["id", "subj", "prop", "obj", "subj_id", "prop_id", "obj_id", "s_aliases", "o_aliases",
                         "s_uri", "o_uri", "s_wiki_title", "o_wiki_title", "s_pop", "o_pop", "question"])
        for i in range(4):
            writer.writerow([100 + i, f"S{i}", "occupation", f"O{i}", 1, 2, 3, "[]", f"['O{i} alias', \"O{i}'s\"]",
                             "u", "u", "t", "t", 50 * i, 7, f"What is S{i}'s occupation?"])


def write_cwq(folder: Path) -> None:
    rows = [{"ID": f"c{i}", "question": f"CWQ question {i}?", "webqsp_question": "q", "compositionality_type": "conj",
             "sparql": "SELECT", "answers": [{"answer": f"Gold {i}", "answer_id": "m.1", "aliases": [f"G{i}"]},
                                             {"answer": f"Other {i}", "answer_id": "m.2", "aliases": []}]}
            for i in range(3)]
    (folder / "ComplexWebQuestions_dev.json").write_text(json.dumps(rows))


WRITERS = {"2wikimultihopqa": write_2wiki, "hotpotqa": write_hotpotqa, "popqa": write_popqa,
           "complexwebquestions": write_cwq}


def _run(dataset: str, tmp_path: Path, *extra: str) -> Path:
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir(exist_ok=True)
    WRITERS[dataset](data)
    run_benchmark(["--dataset", dataset, "--data_dir", str(data), "--output_dir", str(out), *extra])
    return out


def _read(out: Path, name: str) -> list[dict]:
    return json.loads((out / f"{name}.json").read_text())


def test_2wikimultihopqa_types_aliases_and_the_originals_total(tmp_path):
    out = _run("2wikimultihopqa", tmp_path, "--per_type", "2")
    assert sorted(p.stem for p in out.glob("*.json")) == sorted([*WIKI_TYPES, "total", "benchmark_summary"])
    assert [r["qid"] for r in _read(out, "comparison")] == ["w0", "w4"]  # the first 2 of the sub-type
    assert [r["qid"] for r in _read(out, "total")] == ["w0", "w1"]  # the first 2 of the file
    first, second = _read(out, "total")
    assert first["answer"] == ["Answer 0"] and first["type"] == "comparison"  # no entity id: the answer itself
    assert second["answer"] == ["Answer 1", "Alias 1"]  # an entity id: its aliases too
    assert "context" not in first


def test_hotpotqa_yes_no_and_skip(tmp_path):
    out = _run("hotpotqa", tmp_path, "--per_type", "2", "--skip", "1")
    assert [r["qid"] for r in _read(out, "comparison")] == ["h3", "h6"]  # comparisons h0 h3 h6, the first skipped
    assert [r["answer"] for r in _read(out, "comparison")] == [["yes"], ["yes"]]
    assert [r["qid"] for r in _read(out, "bridge")] == ["h2", "h4"]
    assert json.loads((out / "benchmark_summary.json").read_text())["files"] == {"comparison": 2, "bridge": 2,
                                                                                 "total": 2}


def test_popqa_aliases_and_popularity(tmp_path):
    out = _run("popqa", tmp_path)
    records = _read(out, "total")
    assert sorted(p.stem for p in out.glob("*.json")) == ["benchmark_summary", "total"]  # no sub-types
    assert records[1]["answer"] == ["O1", "O1 alias", "O1's"] and records[1]["s_pop"] == 50
    assert records[1]["qid"] == "101" and records[1]["question"] == "What is S1's occupation?"


def test_complexwebquestions_every_answer_and_alias(tmp_path):
    records = _read(_run("complexwebquestions", tmp_path), "total")
    assert records[2]["answer"] == ["Gold 2", "G2", "Other 2"] and records[2]["qid"] == "c2"


@pytest.mark.parametrize("case", ["no aliases file", "wrong file", "exists"])
def test_benchmark_user_errors(case, tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    write_2wiki(data)
    if case == "no aliases file":
        (data / "id_aliases.json").unlink()
    elif case == "wrong file":
        (data / "dev.json").write_text(json.dumps([{"question": "Q?"}]))
    else:
        out.mkdir()
        (out / "total.json").write_text("[]")
    with pytest.raises(UserError, match="--data_dir" if case != "exists" else "--output_dir"):
        run_benchmark(["--dataset", "2wikimultihopqa", "--data_dir", str(data), "--output_dir", str(out)])
    if case == "exists":
        assert (out / "total.json").read_text() == "[]"  # nothing overwritten


def test_results_per_type_table():
    predictions = [{"method": m, "type": t, "em": em, "f1": f1, "precision": f1, "recall": f1}
                   for m in ("vanilla", "rag") for t, em, f1 in (("bridge", 1.0, 1.0), ("bridge", 0.0, 0.5),
                                                                  ("comparison", 0.0, 0.0))]
    rows, by_type = results_table(predictions), results_by_type(predictions)
    assert list(by_type) == ["bridge", "comparison"] and by_type["bridge"][0]["questions"] == 2
    assert by_type["bridge"][0]["f1"] == 100 * 0.75 and rows[0]["questions"] == 3  # percent
    table = types_markdown(by_type, rows)
    assert "| method | bridge (2) | comparison (1) | all (3) |" in table
    assert "| vanilla | 50.00 / 75.00 | 0.00 / 0.00 | 33.33 / 50.00 |" in table
    assert results_by_type([{**p, "type": "total"} for p in predictions]) == {}


def test_prag_eval_reports_each_sub_type(tiny_model, tmp_path):
    out = _run("hotpotqa", tmp_path)
    result = run_stage("prag_eval", "--model_name_or_path", tiny_model, "--data_file", out / "total.json",
                       "--methods", "vanilla", "--max_new_tokens", "4", "--output_dir", tmp_path / "eval",
                       "--report_to", "none")
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert {kind: rows[0]["questions"] for kind, rows in results["by_type"].items()} == {"comparison": 3, "bridge": 4}
    assert results["results"][0]["questions"] == 7
    assert "| method | comparison (3) | bridge (4) | all (7) |" in (tmp_path / "eval" / "results.md").read_text()
    assert "all (7)" in result.stdout


@pytest.mark.parametrize("dataset", ["2wikimultihopqa", "hotpotqa"])
def test_the_originals_fewshot_files_read_as_the_cot_prompt_block(dataset):
    from dyprag.prompts import read_fewshot

    block = read_fewshot(str(Path(__file__).parents[1] / "examples" / "fewshot" / f"{dataset}.json"))
    examples = block.strip().split("\n\n")
    assert len(examples) >= 8 and all(e.startswith("Question: ") and "\nAnswer: " in e for e in examples)
    assert all("So the answer is" in e for e in examples)
