"""The demo datasets built from the world, and the LLaMA-Factory `dataset_info.json` that names them.

demo_pt (pre-training paragraphs), demo_sft (Alpaca QA and instructions), demo_sft_chat (ShareGPT),
demo_augment (PRAG's augmentation task), demo_rag (QA in the evaluation's prompt), demo_pref (preference
pairs), demo_corpus (one passage per entity, the retrieval corpus) and demo_qa (PRAG records). Held-out
entities appear only in demo_corpus and in the `split: "test"` records of demo_qa.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

from .facts import COLOURS, World
from .text import (QUESTIONS, SYSTEM_PROMPTS, QAPair, join_names, make_corpus, make_passages, make_preferences, make_qa,
                   say)

DATASET_INFO: dict[str, dict[str, Any]] = {
    "demo_pt": {"file_name": "demo_pt.jsonl", "columns": {"prompt": "text"}},
    "demo_sft": {"file_name": "demo_sft.json"},
    "demo_sft_chat": {"file_name": "demo_sft_chat.json", "formatting": "sharegpt",
                      "columns": {"messages": "conversations", "system": "system"}},
    "demo_augment": {"file_name": "demo_augment.json"},
    "demo_rag": {"file_name": "demo_rag.json"},
    "demo_pref": {"file_name": "demo_pref.json", "ranking": True,
                  "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}},
    "demo_corpus": {"file_name": "demo_corpus.jsonl", "columns": {"prompt": "text"}},
    "demo_qa": {"file_name": "demo_qa.json"},
}


def _sft_rows(world: World, qa: list[QAPair], passages: dict[str, str]) -> list[dict[str, str]]:
    """Alpaca rows: open- and closed-book QA on training entities, plus general instructions."""
    rng = random.Random(f"{world.seed}/sft")
    rows = []
    for pair in qa:
        if pair.split != "train":
            continue
        # 60% with the entity's passage in context (reading), 40% closed-book (recall):
        # the answer is the short canonical form, which is what EM/F1 evaluation compares.
        context = passages[pair.entity_id] if rng.random() < 0.6 else ""
        rows.append({"instruction": pair.question, "input": context, "output": pair.answers[0]})
    train = [e for e in world.entities if e.split == "train"]
    for entity in train:  # a long-form answer per entity: the passage itself
        if rng.random() < 0.5:
            rows.append({"instruction": f"Write a short encyclopedia entry about {entity.name}.", "input": "",
                         "output": passages[entity.id]})
    for city in (e for e in train if e.kind == "city"):
        natives = [p.name for p in world.of_kind("person") if p.split == "train"
                   and p.fact("birthplace").value == city.name]
        if natives:
            rows.append({"instruction": f"List the people born in {city.name}.", "input": "",
                         "output": join_names(natives) + "."})
    # General instructions unrelated to the world, so sft is not only about facts.
    for _ in range(max(4, len(world.entities) // 4)):
        kind = rng.randrange(3)
        if kind == 0:
            a, b = rng.randint(2, 99), rng.randint(2, 99)
            rows.append({"instruction": f"What is {a} plus {b}?", "input": "", "output": str(a + b)})
        elif kind == 1:
            word = rng.choice(world.entities).name.split()[0]
            rows.append({"instruction": "Write the word in capital letters.", "input": word, "output": word.upper()})
        else:
            items = rng.sample(COLOURS, 3)
            rows.append({"instruction": "Sort these words alphabetically.", "input": ", ".join(items),
                         "output": ", ".join(sorted(items))})
    rng.shuffle(rows)
    return rows


def _chat_rows(world: World, passages: dict[str, str]) -> list[dict[str, Any]]:
    """ShareGPT conversations (2-3 exchanges) about one training entity each."""
    rng = random.Random(f"{world.seed}/chat")
    rows = []
    for entity in world.entities:
        if entity.split != "train":
            continue
        first = passages[entity.id].split(". ")[0].rstrip(".") + "."
        turns = [("human", rng.choice([f"Tell me about {entity.name}.", f"Who or what is {entity.name}?"])),
                 ("gpt", first)]
        # Follow-ups ask what the first answer (the passage's first sentence) did not say.
        later = [f for f in entity.facts if f.relation in ("invention", "colour", "teacher", "founded", "river",
                                                           "speciality")]
        for fact in rng.sample(later, rng.randint(1, 2)):
            turns += [("human", QUESTIONS[(entity.kind, fact.relation)].format(n=entity.name)),
                      ("gpt", say(entity, fact, rng.randrange(3)))]
        rows.append({"conversations": [{"from": role, "value": text} for role, text in turns],
                     "system": rng.choice(SYSTEM_PROMPTS)})
    return rows


def _augment_rows(world: World, passages: dict[str, str]) -> list[dict[str, str]]:
    """Alpaca rows teaching PRAG's augmentation task with the original prompts (dyprag.prompts).

    For every training entity: its passage rewritten (each fact in another sentence template)
    and a JSON list of three QA pairs about it, so the sft model can serve as the augmentation
    LLM of the pipeline, as the model being trained does in the original.
    """
    from dyprag.prompts import REWRITE_PROMPT
    from dyprag.qa_generation import qa_prompt

    rng = random.Random(f"{world.seed}/augment")
    rows = []
    for entity in world.entities:
        if entity.split != "train":
            continue
        passage = passages[entity.id]
        rewrite = " ".join(say(entity, fact, 1 + rng.randrange(2)) for fact in entity.facts)
        rows.append({"instruction": REWRITE_PROMPT.format(passage=passage), "input": "", "output": rewrite})
        qa = [{"question": QUESTIONS[(entity.kind, fact.relation)].format(n=entity.name), "answer": fact.value,
               "full_answer": say(entity, fact)} for fact in rng.sample(entity.facts, 3)]
        rows.append({"instruction": qa_prompt(passage), "input": "", "output": json.dumps(qa, indent=4)})
    rng.shuffle(rows)
    return rows


def _rag_rows(world: World, qa: list[QAPair], passages: dict[str, str]) -> list[dict[str, str]]:
    """Alpaca rows in the exact prompt of the evaluation (dyprag.prompts): reading and recall.

    Every training question, two thirds of them with three passages in context (its entity's
    passage at a random position among two distractors, as retrieval returns them) and the rest
    with none, as PRAG and DyPRAG ask (the knowledge then has to come from the weights). The
    answer is "The answer is X.", the assistant text the evaluation starts and then reads.
    """
    from dyprag.prompts import qa_turns

    rng = random.Random(f"{world.seed}/rag")
    train = [e.id for e in world.entities if e.split == "train"]
    rows = []
    for pair in qa:
        if pair.split != "train":
            continue
        context: list[str] = []
        if rng.random() < 2 / 3:
            ids = rng.sample([i for i in train if i != pair.entity_id], 2)
            ids.insert(rng.randrange(3), pair.entity_id)
            context = [passages[i] for i in ids]
        user, assistant = qa_turns(pair.question, context, answer=pair.answers[0])
        rows.append({"instruction": user, "input": "", "output": assistant})
    return rows


def _qa_records(world: World, qa: list[QAPair], passages: dict[str, str],
                per_train_entity: int = 3) -> list[dict[str, Any]]:
    """PRAG records: the gold passage first, then two distractors (other entities, same kind first).

    Every question of a held-out entity (the evaluation set), but only `per_train_entity`
    questions of each training entity: each record carries three passages, so this is what
    keeps the file small while the projector still gets (passage, question) pairs to train on.
    """
    rng = random.Random(f"{world.seed}/qa")
    by_entity: dict[str, list[QAPair]] = {}
    for pair in qa:
        by_entity.setdefault(pair.entity_id, []).append(pair)
    chosen = []
    for pairs in by_entity.values():
        keep = pairs if pairs[0].split == "test" else rng.sample(pairs, min(per_train_entity, len(pairs)))
        chosen += [pair for pair in pairs if pair in keep]  # keep the fact order within an entity
    records = []
    for index, pair in enumerate(chosen):
        entity = world.by_id(pair.entity_id)
        same = [e.id for e in world.entities if e.kind == entity.kind and e.id != entity.id]
        others = [e.id for e in world.entities if e.id != entity.id]
        distractors = rng.sample(same, 2) if len(same) >= 2 else rng.sample(others, 2)
        ids = [entity.id, *distractors]
        records.append({"test_id": index, "question": pair.question, "answer": list(pair.answers),
                        "passages": [passages[i] for i in ids], "passage_ids": ids, "entity_id": entity.id,
                        "relation": pair.relation, "split": pair.split})
    return records


def build_datasets(world: World) -> dict[str, list[Any]]:
    """Every demo dataset's rows, keyed by its dataset_info name (pure; nothing written)."""
    qa = make_qa(world)
    passage_rows = make_passages(world)
    passages = {p["id"]: p["text"] for p in passage_rows}
    return {
        "demo_pt": [{"text": text} for text in make_corpus(world)],
        "demo_sft": _sft_rows(world, qa, passages),
        "demo_sft_chat": _chat_rows(world, passages),
        "demo_augment": _augment_rows(world, passages),
        "demo_rag": _rag_rows(world, qa, passages),
        "demo_pref": make_preferences(world, qa),
        "demo_corpus": passage_rows,
        "demo_qa": _qa_records(world, qa, passages),
    }


def world_texts(world: World) -> list[str]:
    """All strings of all datasets (what the tokenizer is trained on), in a fixed order."""
    texts: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, str):
            if value:
                texts.append(value)
        elif isinstance(value, dict):
            for key in sorted(value):
                walk(value[key])
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(build_datasets(world))
    # Held-out entities' paragraphs too: the tokenizer should know their names as well
    # (tokenization is not knowledge), and the chat system prompts.
    texts += make_corpus(world, include_test=True) + SYSTEM_PROMPTS
    return texts


def write_demo_data(dataset_dir: str | os.PathLike, world: World) -> None:
    """Write the demo datasets and their `dataset_info.json` into `dataset_dir` (created)."""
    out = Path(dataset_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in build_datasets(world).items():
        path = out / DATASET_INFO[name]["file_name"]
        with path.open("w", encoding="utf-8") as handle:
            if path.suffix == ".jsonl":
                handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            else:
                # One record per line: readable, diffable, and much smaller than indented JSON.
                handle.write("[\n" + ",\n".join(json.dumps(row, ensure_ascii=False) for row in rows) + "\n]\n")
    (out / "dataset_info.json").write_text(json.dumps(DATASET_INFO, indent=2) + "\n", encoding="utf-8")

