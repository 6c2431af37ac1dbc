"""Augmentation: QA replies parsed from JSON, retried a bounded number of times, then skipped and counted."""

from __future__ import annotations

import json

import pytest
from helpers import run_stage

from dyprag.qa_generation import (HFGenerator, augment_passages, augment_records, distinct_passages, parse_qa,
                                  qa_prompt, refill)
from dyprag.prompts import QA_PROMPT, REWRITE_PROMPT

GOOD = ('[{"question": "Q1?", "answer": "A1", "full_answer": "F1."}, '
        '{"question": "Q2?", "answer": "A2", "full_answer": "F2."}, '
        '{"question": "Q3?", "answer": "A3", "full_answer": "F3."}]')


def _pairs(n: int) -> list[dict[str, str]]:
    return [{"question": f"Q{i}?", "answer": f"A{i}", "full_answer": f"F{i}."} for i in range(1, n + 1)]


@pytest.mark.parametrize("reply", [
    GOOD,
    "Sure! Here are the questions:\n" + GOOD + "\nI hope this helps.",  # chatter around the list
    GOOD[:-1] + ",",                                                   # list left open (Llama-3.2-1B)
    GOOD.replace(', "full_answer"', '\n "full_answer"'),               # the comma the prompt's example omits
    GOOD[:-1] + ', {"question": "Q4?", "answer": "A4", "full_answer": "F4."}]',  # extra pairs are cut
])
def test_parse_qa_accepts_and_repairs(reply):
    assert parse_qa(reply, 3) == _pairs(3)


@pytest.mark.parametrize("reply", [
    "",
    "I cannot do that.",
    GOOD.replace('"full_answer": "F2.", ', "").replace(', "full_answer": "F2."', ""),  # a pair lacks a key
    '[{"question": "Q1?", "answer": "A1", "full_answer": "F1."}]',                   # fewer than three
    '{"question": "Q1?", "answer": "A1", "full_answer": "F1."}',                     # not a list
    '[{"question": "Q1?", "answer": "A1", "full_answer": "F1."}, "x", "y"]',
])
def test_parse_qa_rejects(reply):
    assert parse_qa(reply, 3) is None


def test_parse_qa_fixes_answer_types_as_the_original():
    reply = json.dumps([{"question": "Q?", "answer": ["a", "b"], "full_answer": "F"},
                        {"question": "Q?", "answer": 1912, "full_answer": "F"},
                        {"question": "Q?", "answer": None, "full_answer": "F"}])
    assert [p["answer"] for p in parse_qa(reply, 3)] == ["a, b", "1912", "Unknown"]
    assert parse_qa(reply, 2) is not None and len(parse_qa(reply, 2)) == 2


def test_prompts_are_the_originals():
    assert qa_prompt("P", 3) == QA_PROMPT.format(passage="P")
    assert qa_prompt("P", 3).startswith("I will provide a passage of text, and you need to generate three different "
                                        "questions")
    assert "generate five different" in qa_prompt("P", 5) and "at least five elements" in qa_prompt("P", 5)
    assert qa_prompt("P").endswith("Passage:\nP") and '"answer": "Paris"\n' in qa_prompt("P")
    assert REWRITE_PROMPT.format(passage="P").startswith("Rewrite the following passage.")


class FakeLLM:
    """Scripted replies per passage: QA prompts get the next reply of that passage's script."""

    def __init__(self, scripts: dict[str, list[str]], rewrite: str = "A rewrite.") -> None:
        self.scripts = {key: list(replies) for key, replies in scripts.items()}
        self.rewrite = rewrite
        self.qa_calls: dict[str, int] = dict.fromkeys(scripts, 0)
        self.batches: list[int] = []

    def __call__(self, prompts: list[str]) -> list[str]:
        self.batches.append(len(prompts))
        replies = []
        for prompt in prompts:
            passage = prompt.rsplit("\n", 1)[-1]
            if prompt.startswith("Rewrite"):
                replies.append(self.rewrite)
                continue
            self.qa_calls[passage] += 1
            script = self.scripts[passage]
            replies.append(script.pop(0) if len(script) > 1 else script[0])
        return replies


def test_bad_json_is_retried_then_skipped_and_counted():
    llm = FakeLLM({"good": [GOOD], "late": ["not json", GOOD[:40], GOOD], "never": ["nope"]})
    results, stats = augment_passages(["good", "late", "never"], llm, num_qa=3, max_attempts=4, ids=["g", "l", "n"])
    assert results[0].qa == _pairs(3) and results[1].qa == _pairs(3) and results[0].rewrite == "A rewrite."
    assert results[2] is None
    assert llm.qa_calls == {"good": 1, "late": 3, "never": 4}  # retried until parsed, never beyond max_attempts
    assert stats.to_dict() == {"passages": 3, "augmented": 2, "skipped_qa": 1, "skipped_rewrite": 0,
                               "qa_requests": 8, "skipped_ids": ["n"], "skipped": 1}
    assert llm.batches == [3, 3, 2, 2, 1]  # one rewrite batch, then only the pending passages are asked again


def test_empty_rewrite_skips_the_passage():
    _, stats = augment_passages(["good"], FakeLLM({"good": [GOOD]}, rewrite="  "), max_attempts=2)
    assert (stats.skipped_rewrite, stats.augmented) == (1, 0)


def test_augment_records_writes_the_prag_format():
    records = [{"test_id": 7, "question": "Q?", "answer": ["A"], "passage_ids": ["stale"]},
               {"test_id": 8, "question": "R?", "answer": ["B"]}]
    passages = [["p0", "bad", "p2"], ["p2", "p0"]]
    texts, first_ids = distinct_passages(records, passages)
    assert texts == ["p0", "bad", "p2"] and first_ids == ["7_0", "7_1", "7_2"]  # p2, p0 of record 8 reuse them
    llm = FakeLLM({"p0": [GOOD], "bad": ["no"], "p2": [GOOD]})
    results, stats = augment_passages(texts, llm, max_attempts=2, ids=first_ids)
    assert stats.passages == 3 and stats.qa_requests == 4  # each distinct text asked once, "bad" twice
    augmentations = dict(zip(texts, results))
    out = augment_records(records, passages, augmentations, "tiny-llm", passage_ids=[["c0", "c1", "c2"], ["c2", "c0"]])
    record = out[0]
    assert record["passages"] == ["p0", "p2"] and record["passage_ids"] == ["c0", "c2"]
    assert [a["pid"] for a in record["augment"]] == [0, 1]  # renumbered: bank keys 7_0, 7_1
    assert record["augment"][1] == {"pid": 1, "passage": "p2", "tiny-llm_rewrite": "A rewrite.",
                                    "tiny-llm_qa": _pairs(3)}
    assert [a["passage"] for a in out[1]["augment"]] == ["p2", "p0"] and out[1]["passage_ids"] == ["c2", "c0"]
    assert out[1]["augment"][0]["tiny-llm_qa"] == record["augment"][1]["tiny-llm_qa"]
    assert stats.skipped_ids == ["7_1"] and records[0]["passage_ids"] == ["stale"]  # input untouched

    # keep_skipped: the skipped passage stays in place without an augmentation entry.
    kept = augment_records(records, passages, augmentations, "tiny-llm", passage_ids=[["c0", "c1", "c2"], ["c2", "c0"]],
                           keep_skipped=True)
    assert kept[0]["passages"] == ["p0", "bad", "p2"] and kept[0]["passage_ids"] == ["c0", "c1", "c2"]
    assert [a["pid"] for a in kept[0]["augment"]] == [0, 2]


def test_refill_tries_the_next_candidates_until_top_k_parsed():
    """The original's refill: a skipped passage is replaced by the record's next candidate, in order; texts shared
    by records are augmented once; a record whose candidates run out keeps what parsed."""
    llm = FakeLLM({"p0": [GOOD], "bad": ["no"], "p2": [GOOD], "p3": [GOOD], "bad2": ["no"], "p4": [GOOD],
                   "p5": [GOOD]})
    asked = []

    def augment(texts):
        asked.append(texts)
        return augment_passages(texts, llm, max_attempts=1)[0]

    records = [{"test_id": 1}, {"test_id": 2}, {"test_id": 3}]
    passages = [["p0", "bad", "p2", "p3"], ["bad", "p2", "bad2", "p4", "p5"], ["bad2", "bad"]]
    tried, results = refill(passages, 2, augment)
    assert tried == [["p0", "bad", "p2"], ["bad", "p2", "bad2", "p4"], ["bad2", "bad"]]
    assert asked == [["p0", "bad", "p2", "bad2"], ["p4"]]  # rounds; "bad" and "p2" asked once for both records
    out = augment_records(records, tried, results, "m")
    assert [r["passages"] for r in out] == [["p0", "p2"], ["p2", "p4"], []]
    assert [[a["pid"] for a in r["augment"]] for r in out] == [[0, 1], [0, 1], []]  # bank keys by position
    assert refill(passages, 2, lambda texts: [None] * len(texts))[0] == passages  # nothing parses: all tried


def test_candidates_flag_checks():
    from stages.core.dyprag_arguments import AugmentArguments
    from stages.core.errors import UserError

    assert AugmentArguments(input_file="q.txt", top_k=3).candidates == 3  # default: no replacement
    for kwargs in ({"candidates": 2}, {"candidates": 13, "keep_skipped": True}):
        with pytest.raises(UserError, match="--candidates"):
            AugmentArguments(input_file="q.txt", top_k=3, **kwargs)


def test_batched_left_padded_generation_equals_one_at_a_time(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    prompts = ["Who is Kreilshom?", "Write a short encyclopedia entry about a city in the north.", "Hi"]
    batched = HFGenerator(model, tokenizer, batch_size=3, max_new_tokens=8, do_sample=False)(prompts)
    single = [HFGenerator(model, tokenizer, batch_size=1, max_new_tokens=8, do_sample=False)([p])[0]
              for p in prompts]
    assert batched == single and any(batched)


def test_stage_with_tiny_model_skips_and_reports(tiny_model, demo_data, tmp_path):
    # A random tiny model never writes a JSON list: every passage is asked max_attempts times,
    # then skipped, and the summary (file + stdout) says so. The 3 records' 6 passages are 3 texts.
    out = tmp_path / "aug"
    result = run_stage("augment", "--model_name_or_path", tiny_model, "--input_file", demo_data / "demo_qa.json",
                       "--output_dir", out, "--max_samples", "3", "--top_k", "2", "--max_attempts", "2",
                       "--max_new_tokens", "12", "--per_device_eval_batch_size", "4", "--report_to", "none")
    summary = json.loads((out / "augment_summary.json").read_text())
    assert summary["passages_in_records"] == 6 and summary["passages"] == 3
    assert summary["skipped_qa"] == 3 and summary["augmented"] == 0
    assert summary["qa_requests"] == 6 and summary["augment_model_name"] == "model"
    assert '"skipped": 3' in result.stdout and "skipped 3" in result.stderr
    records = json.loads((out / "augmented.json").read_text())
    assert len(records) == 3 and all(r["augment"] == [] and r["passages"] == [] for r in records)


def test_stage_tries_every_candidate_when_nothing_parses(tiny_model, demo_data, tmp_path):
    """--candidates 3 --top_k 2: the random model's replies never parse, so each question's third passage is tried
    too (in a second round); the summary counts the distinct texts and no replacement kept."""
    out = tmp_path / "aug"
    result = run_stage("augment", "--model_name_or_path", tiny_model, "--input_file", demo_data / "demo_qa.json",
                       "--output_dir", out, "--max_samples", "3", "--top_k", "2", "--candidates", "3",
                       "--max_attempts", "1", "--max_new_tokens", "8", "--report_to", "none")
    records = json.loads((demo_data / "demo_qa.json").read_text())[:3]
    summary = json.loads((out / "augment_summary.json").read_text())
    assert summary["passages_in_records"] == 9 and summary["refilled"] == 0
    assert summary["passages"] == summary["skipped_qa"] == len({p for r in records for p in r["passages"][:3]})
    assert "0 kept in place of a skipped one" in result.stderr
