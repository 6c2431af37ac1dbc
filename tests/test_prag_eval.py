"""PRAG evaluation end to end on the synthetic world: sft -> encode (-> projector) -> prag_eval, and its outputs.

The questions are the embedded demo_qa `test` records: facts of held-out entities that no
training set contains, so the frozen model cannot know them. Each record keeps its gold
passage only (retrieval is not under test here; --top_k 1). The passages are augmented by an
oracle standing in for the augmentation LLM: a rewrite (the facts in other words) and QA pairs
about every fact of the passage's entity, in the public record format. An LLM prompted with
PRAG's QA prompt writes such pairs; the tiny model cannot, so the world's own questions are
used, which the eval then asks (PRAG's setting: the LoRA is trained on QA about the passage).

The tiny model first learns the original prompt format by a short sft (`--train_on_prompt`, so
the prompt text is no surprise to it and the passage LoRAs spend their few parameters on the
facts): "The answer is X." after the question, with the entity's passage in context or
closed-book, about the entities of other seeds' worlds (never the eval's). PRAG must then
answer the held-out questions from the passage LoRAs alone, clearly better than vanilla, and a
control with every question given another entity's LoRA must lose that gain. DyPRAG (part 2) on
the same task: a projector trained on five entities' passages and their bank LoRAs must close
most of the vanilla -> PRAG gap on those passages, and lose it given another entity's passage.

Standard RAG is run and printed but not asserted: reading a value out of a passage in context is a
skill the tiny model does not acquire reliably in a test's budget (it answers with a value of the
right kind, a year or a colour, not the passage's), so no RAG margin would hold on every CPU and seed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from helpers import launch, oracle_records, run_stage, stage_env

SFT_WORLDS = range(1, 11)  # seeds of the sft worlds; the eval's world is seed 0 (the fixture's)
METHODS = ["vanilla", "rag", "prag", "prag_combine"]


def _sft_rows(seed: int, rng: random.Random) -> list[dict[str, str]]:
    """PRAG-prompt QA rows about one world: the entity's passage in context, a quarter closed-book too."""
    from dyprag.prompts import qa_turns
    from stages.world import generate_world, make_passages, make_qa

    world = generate_world(seed, 40)
    passages = {p["id"]: p["text"] for p in make_passages(world)}
    rows = []
    for pair in make_qa(world):
        contexts = [[passages[pair.entity_id]]] + ([None] if rng.random() < 0.25 else [])
        for context in contexts:
            user, assistant = qa_turns(pair.question, context, pair.answers[0])
            rows.append({"instruction": user, "output": assistant})
    return rows


@pytest.fixture(scope="module")
def evaluated(tiny_model, demo_data, tmp_path_factory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("prag_eval")
    rng = random.Random(0)
    rows = [row for seed in SFT_WORLDS for row in _sft_rows(seed, rng)]
    rng.shuffle(rows)
    (work / "data").mkdir()
    (work / "data" / "prag_sft.json").write_text(json.dumps(rows))
    (work / "data" / "dataset_info.json").write_text(json.dumps({"prag_sft": {"file_name": "prag_sft.json"}}))
    records = work / "records.json"
    records.write_text(json.dumps(oracle_records(0)))

    env = stage_env()
    model = work / "sft"
    run_stage("sft", "--model_name_or_path", tiny_model, "--dataset", "prag_sft", "--dataset_dir", work / "data",
              "--output_dir", model, "--do_train", "--finetuning_type", "full", "--train_on_prompt",
              "--per_device_train_batch_size", "16", "--learning_rate", "3e-3", "--max_steps", "150",
              "--warmup_steps", "20", "--lr_scheduler_type", "constant_with_warmup", "--max_grad_norm", "1.0",
              "--cutoff_len", "256", "--save_strategy", "no", "--report_to", "none", env=env)
    # A rank-16 LoRA per passage (the original's rank 2 is for 1B+ models; this model's MLPs are 64 wide),
    # trained longer and faster than the original's one epoch at 3e-4, so it holds a handful of facts.
    bank = work / "bank"
    run_stage("encode", "--model_name_or_path", model, "--input_file", records, "--output_dir", bank,
              "--lora_rank", "16", "--lora_alpha", "32", "--learning_rate", "1e-2", "--num_train_epochs", "10",
              "--report_to", "none", env=env)
    out, wandb_dir = work / "eval", work / "wandb"
    wandb_dir.mkdir()
    result = run_stage("prag_eval", "--model_name_or_path", model, "--data_file", records, "--bank_dir", bank,
                       "--output_dir", out, "--top_k", "1", "--per_device_eval_batch_size", "32",
                       "--report_to", "wandb", env=stage_env(WANDB_MODE="offline", WANDB_DIR=str(wandb_dir)))
    return {"model": model, "records": records, "bank": bank, "out": out, "wandb": wandb_dir, "stdout": result.stdout}


def _per_question(out: Path) -> dict[str, dict[str, dict[str, float]]]:
    """method -> test_id -> {"em", "f1"} of that question, from prag_eval's predictions.jsonl."""
    scores: dict[str, dict[str, dict[str, float]]] = {}
    for line in (out / "predictions.jsonl").read_text().splitlines():
        prediction = json.loads(line)
        scores.setdefault(prediction["method"], {})[prediction["test_id"]] = {k: prediction[k] for k in ("em", "f1")}
    return scores


def _shift_to_other_entities(records: list[dict]) -> int:
    """The smallest rotation that pairs every record with a record about another entity."""
    return next(k for k in range(1, len(records))
                if all(r["entity_id"] != records[(i + k) % len(records)]["entity_id"] for i, r in enumerate(records)))


def test_prag_answers_what_vanilla_cannot(evaluated):
    out = evaluated["out"]
    payload = json.loads((out / "results.json").read_text())
    table = {row["method"]: row for row in payload["results"]}
    print("\n" + (out / "results.md").read_text())
    assert list(table) == METHODS
    records = json.loads(evaluated["records"].read_text())
    assert all(row["questions"] == len(records) for row in table.values())
    # Clearly better: at least 5 more questions right (of 54) and twice vanilla's score, EM and F1 (in percent).
    margin = 100 * 5 / len(records)
    for method in ("prag", "prag_combine"):
        for key in ("em", "f1"):
            assert table[method][key] >= max(table["vanilla"][key] + margin, 2 * table["vanilla"][key]), table
    # RAG is not asserted: this model does not learn to read a passage in context within a test's budget
    # (it answers with the right kind of value, not the passage's); see the module docstring.

    # The table as printed, in markdown, and the predictions behind it.
    markdown = (out / "results.md").read_text()
    assert all(f"| {m} | {len(records)} |" in markdown for m in METHODS)
    assert markdown.split("\n\n", 1)[1] in evaluated["stdout"]
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == len(METHODS) * len(records)
    for method in METHODS:
        mine = [p for p in predictions if p["method"] == method]
        assert [p["test_id"] for p in mine] == [r["test_id"] for r in records]
        assert 100 * sum(p["em"] for p in mine) / len(mine) == pytest.approx(table[method]["em"])
    assert payload["config"]["top_k"] == 1

    # W&B (offline): the same table, logged as a table file.
    tables = list(evaluated["wandb"].glob("wandb/offline-run-*/files/media/table/**/*.table.json"))
    assert len(tables) == 1, tables
    logged = json.loads(tables[0].read_text())
    rows = [dict(zip(logged["columns"], row)) for row in logged["data"]]
    assert [row["method"] for row in rows] == METHODS
    for row in rows:
        assert row["em"] == pytest.approx(table[row["method"]]["em"])
        assert row["f1"] == pytest.approx(table[row["method"]]["f1"])


def test_prag_knowledge_comes_from_the_question_s_own_passage(evaluated, tmp_path):
    """Control: each question gets the LoRA of a passage about another entity; PRAG's gain is gone."""
    records = json.loads(evaluated["records"].read_text())
    shift = _shift_to_other_entities(records)
    swapped = [{**record, "test_id": records[(i + shift) % len(records)]["test_id"]}  # bank key: another passage
               for i, record in enumerate(records)]
    (tmp_path / "swapped.json").write_text(json.dumps(swapped))
    run_stage("prag_eval", "--model_name_or_path", evaluated["model"], "--data_file", tmp_path / "swapped.json",
              "--bank_dir", evaluated["bank"], "--output_dir", tmp_path / "eval", "--top_k", "1", "--methods", "prag",
              "--per_device_eval_batch_size", "32", "--report_to", "none", env=stage_env(OMP_NUM_THREADS="2"))
    wrong = json.loads((tmp_path / "eval" / "results.json").read_text())["results"][0]
    right = {row["method"]: row for row in json.loads((evaluated["out"] / "results.json").read_text())["results"]}
    assert right["prag"]["em"] >= wrong["em"] + 100 * 5 / len(records), (right["prag"], wrong)


def test_dyprag_closes_the_gap_on_its_training_passages(evaluated, tmp_path):
    """DyPRAG on this task: a projector trained (stages.projector) on the passages of five of the
    eight entities turns those passages into LoRAs that close most of the vanilla -> PRAG gap on
    their questions; given another entity's passage the gain is gone (it reads the passage, it did
    not memorise answers). The three held-out entities' rows are printed next to vanilla, RAG and
    PRAG, not asserted: a projector trained on five passages is not expected to generalise."""
    records = json.loads(evaluated["records"].read_text())
    seen = set(list(dict.fromkeys(r["entity_id"] for r in records))[:5])
    train = [r for r in records if r["entity_id"] in seen]
    (tmp_path / "train.json").write_text(json.dumps(train))
    env = stage_env()
    common = ["--model_name_or_path", evaluated["model"], "--bank_dir", evaluated["bank"], "--report_to", "none"]
    projector = tmp_path / "projector"
    run_stage("projector", *common, "--data_file", tmp_path / "train.json", "--output_dir", projector,
              "--learning_rate", "1e-3", "--num_train_epochs", "5", "--per_device_train_batch_size", "8",
              "--save_strategy", "no", env=env)
    evaluate = [*common, "--projector_dir", projector, "--top_k", "1", "--per_device_eval_batch_size", "32"]
    run_stage("prag_eval", *evaluate, "--data_file", evaluated["records"], "--output_dir", tmp_path / "eval", env=env)
    scores = _per_question(tmp_path / "eval")
    groups = {"training passages": [r["test_id"] for r in train],
              "held-out passages": [r["test_id"] for r in records if r["entity_id"] not in seen]}
    table = {(group, key): {method: sum(scores[method][i][key] for i in ids) / len(ids) for method in scores}
             for group, ids in groups.items() for key in ("em", "f1")}
    print("\nquestions | metric (%) | " + " | ".join(scores))
    for (group, key), row in table.items():
        print(f"{group} ({len(groups[group])}) | {key} | " + " | ".join(f"{100 * row[m]:.1f}" for m in scores))

    trained = table["training passages", "em"]
    margin = 5 / len(train)
    assert trained["prag"] >= trained["vanilla"] + margin, trained  # a gap to close
    assert trained["dyprag"] - trained["vanilla"] >= 0.5 * (trained["prag"] - trained["vanilla"]), trained
    assert trained["dyprag"] >= trained["vanilla"] + margin, trained

    # Control: every training question with the passage of another entity.
    shift = _shift_to_other_entities(train)
    swapped = [{**r, "passages": train[(i + shift) % len(train)]["passages"]} for i, r in enumerate(train)]
    (tmp_path / "swapped.json").write_text(json.dumps(swapped))
    run_stage("prag_eval", *evaluate, "--data_file", tmp_path / "swapped.json", "--methods", "dyprag",
              "--output_dir", tmp_path / "swapped", env=env)
    wrong = json.loads((tmp_path / "swapped" / "results.json").read_text())["results"][0]["em"] / 100  # percent
    assert trained["dyprag"] >= wrong + margin, (trained, wrong)


@pytest.mark.slow
def test_two_ranks_answer_like_one(evaluated, tmp_path):
    """`bash launch/prag_eval.sh` on 2 ranks: each answers its share; rank 0 writes what one process writes.

    Batches of one on both sides: then no padding differs and greedy answers must be identical.
    """
    args = ["--model_name_or_path", evaluated["model"], "--data_file", evaluated["records"], "--bank_dir",
            evaluated["bank"], "--top_k", "1", "--max_samples", "9", "--methods", "vanilla,prag",
            "--per_device_eval_batch_size", "1", "--report_to", "none"]
    run_stage("prag_eval", *args, "--output_dir", tmp_path / "one", env=stage_env(OMP_NUM_THREADS="1"))
    launch("prag_eval", *args, "--output_dir", tmp_path / "two")
    one, two = ([json.loads(line) for line in (tmp_path / name / "predictions.jsonl").read_text().splitlines()]
                for name in ("one", "two"))
    assert len(two) == 18 and two == one
    assert json.loads((tmp_path / "two" / "results.json").read_text())["results"] == \
        json.loads((tmp_path / "one" / "results.json").read_text())["results"]


def test_the_old_dyprag_combination_flag_is_read_as_combination(tiny_model, demo_data, tmp_path):
    """--dyprag_combination is spelled --combination, as in projector_export; the old name works, with a notice."""
    out = tmp_path / "eval"
    result = run_stage("prag_eval", "--model_name_or_path", tiny_model, "--data_file", demo_data / "demo_qa.json",
                       "--max_samples", "2", "--methods", "vanilla", "--max_new_tokens", "2",
                       "--dyprag_combination", "deltas", "--output_dir", out, "--report_to", "none")
    assert "--dyprag_combination is renamed --combination; the old name is accepted" in result.stderr
    config = json.loads((out / "results.json").read_text())["config"]
    assert config["combination"] == "deltas" and "dyprag_combination" not in config
