"""The data path of issue 2, in process: registry -> aligned rows -> model inputs.

Registry entries are written the way LLaMA-Factory users write them; supervised masking is
checked by decoding the labelled tokens; packing is checked numerically with the tiny model
(each packed sample gives the logits and loss it gives alone).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections import Counter
from functools import partial
from pathlib import Path

import pytest
import torch

from stages.core.data import get_dataset
from stages.core.data.collator import SupervisedCollator
from stages.core.data.loading import load_aligned
from stages.core.data.processors import encode_supervised, packed_supervised, pt_blocks, supervised
from stages.core.data.template import get_template
from stages.core.errors import UserError
from stages.core.arguments import IGNORE_INDEX, DataArguments

ALPACA_ROWS = [
    {"instruction": "Name the river of Zorb.", "input": "", "output": "The Glimne River."},
    {"instruction": "Translate the word.", "input": "house", "output": "maison"},
    {"instruction": "Who founded Velk?", "input": "", "output": "Brumcath founded Velk in 995."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
]


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def bot(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def aligned_alpaca(row: dict) -> dict:
    query = "\n".join(text for text in (row["instruction"], row["input"]) if text)
    return {"_prompt": [user(query)], "_response": [bot(row["output"])], "_system": ""}


class TrainingArgsStub:
    """What get_dataset reads from TrainingArguments (importing those costs ~10 s on a CPU box)."""

    seed = 0
    do_predict = False

    def main_process_first(self, desc: str):
        return contextlib.nullcontext()


def write_rows(path: Path, rows: list[dict]) -> Path:
    """rows in the format the suffix names (json, jsonl, csv, parquet)."""
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=1))
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif path.suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path)
    return path


def registry(folder: Path, **entries: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset_info.json").write_text(json.dumps(entries, indent=2))
    return folder


def load(folder: Path, dataset: str, ranking: bool | None = None, **kwargs) -> list[dict]:
    data_args = DataArguments(dataset=dataset, dataset_dir=str(folder), **kwargs)
    return list(load_aligned(data_args.dataset_names, data_args, seed=0, ranking=ranking))


def label_spans(input_ids: list[int], labels: list[int]) -> list[list[int]]:
    """The maximal runs of labelled positions, as token ids (labels must equal the inputs there)."""
    spans, current = [], []
    for token, label in zip(input_ids, labels):
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            assert label == token, "a label differs from its input token"
            current.append(token)
    return spans + ([current] if current else [])


# ------------------------------------------------------------------------------ registry

@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_local_file_formats_load_the_same_rows(tmp_path, suffix):
    write_rows(tmp_path / f"rows{suffix}", ALPACA_ROWS)
    registry(tmp_path, rows={"file_name": f"rows{suffix}"})  # a LLaMA-Factory alpaca entry, defaults only
    assert load(tmp_path, "rows") == [aligned_alpaca(row) for row in ALPACA_ROWS]


def test_llamafactory_demo_entries_load_unchanged(real_data):
    """LLaMA-Factory's own entries and files (alpaca, identity, c4 text, sharegpt dpo) load as they are."""
    source = Path(json.loads((real_data / "dataset_info.json").read_text())["alpaca_en_demo"]["file_name"]).parent
    alpaca = json.loads((source / "alpaca_en_demo.json").read_text())
    assert load(real_data, "alpaca_en_demo") == [aligned_alpaca(row) for row in alpaca]
    assert len(load(real_data, "identity")) == len(json.loads((source / "identity.json").read_text()))
    c4 = [json.loads(line)["text"] for line in (source / "c4_demo.jsonl").read_text().splitlines()]
    assert [row["_prompt"] for row in load(real_data, "c4_demo")] == [[user(text)] for text in c4]
    dpo = json.loads((source / "dpo_en_demo.json").read_text())
    pairs = load(real_data, "dpo_en_demo", ranking=True)
    assert [[answer["content"] for answer in row["_response"]] for row in pairs] == [
        [row["chosen"]["value"], row["rejected"]["value"]] for row in dpo]
    assert all(row["_prompt"][-1]["role"] == "user" for row in pairs)


def test_txt_is_one_sample_per_line(tmp_path):
    lines = ["The Glimne River flows through Zorb.", "Velk was founded in 995.", "Brumcath made the first lens."]
    (tmp_path / "wiki.txt").write_text("\n".join(lines) + "\n")
    registry(tmp_path, wiki={"file_name": "wiki.txt", "columns": {"prompt": "text"}})
    rows = load(tmp_path, "wiki")
    assert [row["_prompt"] for row in rows] == [[user(line)] for line in lines]
    assert all(row["_response"] == [] for row in rows)


def test_a_folder_of_files_is_one_dataset(tmp_path):
    write_rows(tmp_path / "parts" / "part-0.json", ALPACA_ROWS[:2])
    write_rows(tmp_path / "parts" / "part-1.jsonl", ALPACA_ROWS[2:])  # json and jsonl: one builder
    write_rows(tmp_path / "mixed" / "a.json", ALPACA_ROWS[:2])
    write_rows(tmp_path / "mixed" / "b.csv", ALPACA_ROWS[2:])
    registry(tmp_path, parts={"file_name": "parts"}, mixed={"file_name": "mixed"})
    assert load(tmp_path, "parts") == [aligned_alpaca(row) for row in ALPACA_ROWS]
    with pytest.raises(UserError, match="mixed.*one type"):
        load(tmp_path, "mixed")


def test_columns_history_system_and_tags_map_onto_turns(tmp_path):
    write_rows(tmp_path / "custom.json", [{"question": "And now?", "context": "be short", "answer": "Done.",
                                           "sys": "You are terse.", "past": [["First?", "One."], ["Second?", "Two."]]}])
    write_rows(tmp_path / "chat.json", [{"dialog": [
        {"speaker": "sys", "text": "Be kind."}, {"speaker": "me", "text": "Hi"}, {"speaker": "bot", "text": "Hello"},
        {"speaker": "me", "text": "Bye"}, {"speaker": "bot", "text": "Goodbye"}]}])
    registry(
        tmp_path,
        custom={"file_name": "custom.json", "columns": {"prompt": "question", "query": "context", "response": "answer",
                                                        "system": "sys", "history": "past"}},
        chat={"file_name": "chat.json", "formatting": "sharegpt", "columns": {"messages": "dialog"},
              "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "me", "assistant_tag": "bot",
                       "system_tag": "sys"}},
    )
    assert load(tmp_path, "custom") == [{"_prompt": [user("First?"), bot("One."), user("Second?"), bot("Two."),
                                                     user("And now?\nbe short")],
                                         "_response": [bot("Done.")], "_system": "You are terse."}]
    assert load(tmp_path, "chat") == [{"_prompt": [user("Hi"), bot("Hello"), user("Bye")],
                                       "_response": [bot("Goodbye")], "_system": "Be kind."}]


def test_ranking_entries_give_chosen_then_rejected(tmp_path, demo_data):
    # LLaMA-Factory's dpo_en_demo layout: sharegpt conversations + chosen/rejected message dicts.
    write_rows(tmp_path / "dpo.json", [{"conversations": [{"from": "human", "value": "Best colour?"}],
                                        "chosen": {"from": "gpt", "value": "Teal."},
                                        "rejected": {"from": "gpt", "value": "I refuse."}}])
    info = json.loads((demo_data / "dataset_info.json").read_text())
    registry(tmp_path, dpo={"file_name": "dpo.json", "ranking": True, "formatting": "sharegpt",
                            "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
             demo_pref={**info["demo_pref"], "file_name": str(demo_data / info["demo_pref"]["file_name"])})
    assert load(tmp_path, "dpo", ranking=True) == [{"_prompt": [user("Best colour?")], "_system": "",
                                                    "_response": [bot("Teal."), bot("I refuse.")]}]
    raw = json.loads((demo_data / "demo_pref.json").read_text())
    pref = load(tmp_path, "demo_pref", ranking=True)
    assert [[r["content"] for r in row["_response"]] for row in pref] == [[r["chosen"], r["rejected"]] for r in raw]
    with pytest.raises(UserError, match="'dpo' is pairwise"):
        load(tmp_path, "dpo", ranking=False)


def test_split_selects_rows(tmp_path):
    # A folder holding train/test files (a hub dataset's layout): "split" picks one of them.
    write_rows(tmp_path / "hublike" / "data" / "train.jsonl", ALPACA_ROWS[:3])
    write_rows(tmp_path / "hublike" / "data" / "test.jsonl", ALPACA_ROWS[3:])
    write_rows(tmp_path / "rows.json", ALPACA_ROWS)
    registry(tmp_path, held_out={"script_url": "hublike", "split": "test"},
             head={"file_name": "rows.json", "split": "train[:2]"})
    assert load(tmp_path, "held_out") == [aligned_alpaca(ALPACA_ROWS[3])]
    assert load(tmp_path, "head") == [aligned_alpaca(row) for row in ALPACA_ROWS[:2]]


@pytest.mark.parametrize("name,text,line", [
    ("array.json", '[\n{"instruction": "a", "output": "b"},\n{"instruction": "c" "output": "d"}\n]\n', 3),
    ("lines.jsonl", '{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": }\n', 3),
    ("lines_in.json", '{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n{"instr\n', 3),
])
def test_malformed_json_is_a_user_error_naming_the_line(tmp_path, name, text, line):
    (tmp_path / name).write_text(text)
    registry(tmp_path, broken={"file_name": name})
    with pytest.raises(UserError, match=rf"{name} line {line} is not valid JSON"):
        load(tmp_path, "broken")


def test_sha1_mismatch_warns_but_loads(tmp_path, caplog):
    path = write_rows(tmp_path / "rows.json", ALPACA_ROWS)
    digest = hashlib.sha1(path.read_bytes()).hexdigest()
    registry(tmp_path, good={"file_name": "rows.json", "file_sha1": digest},
             stale={"file_name": "rows.json", "file_sha1": "0" * 40})
    with caplog.at_level(logging.WARNING, logger="stages.core.data"):
        assert len(load(tmp_path, "good")) == len(ALPACA_ROWS)
        assert not [r for r in caplog.records if "sha1" in r.getMessage()]
        assert len(load(tmp_path, "stale")) == len(ALPACA_ROWS)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "sha1" in r.getMessage()]
    assert len(warnings) == 1 and "stale" in warnings[0] and str(path) in warnings[0]


def test_several_datasets_mix(tmp_path):
    first = [{"instruction": f"a{i}", "input": "", "output": "x"} for i in range(3)]
    second = [{"instruction": f"b{i}", "input": "", "output": "y"} for i in range(5)]
    write_rows(tmp_path / "a.json", first)
    write_rows(tmp_path / "b.jsonl", second)
    registry(tmp_path, a={"file_name": "a.json"}, b={"file_name": "b.jsonl"})

    def order(**kwargs) -> list[str]:
        return [row["_prompt"][0]["content"] for row in load(tmp_path, "a,b", **kwargs)]

    assert order() == ["a0", "a1", "a2", "b0", "b1", "b2", "b3", "b4"]
    # interleave_under stops when the smaller set runs out; interleave_over repeats it until the larger one does.
    assert order(mix_strategy="interleave_under") == ["a0", "b0", "a1", "b1", "a2", "b2"]
    assert order(mix_strategy="interleave_over") == ["a0", "b0", "a1", "b1", "a2", "b2", "a0", "b3", "a1", "b4"]
    assert order(max_samples=2) == ["a0", "a1", "b0", "b1"]  # max_samples applies per dataset


def _sft_rows(data_args: DataArguments, tokenizer, template: str = "default", cutoff_len: int = 256):
    encode = partial(supervised, tokenizer=tokenizer, template=get_template(tokenizer, template),
                     cutoff_len=cutoff_len, train_on_prompt=False)
    return get_dataset(data_args, TrainingArgsStub(), encode, ranking=False)


@pytest.mark.parametrize("val_size,eval_rows", [(0.25, 4), (3, 3)])
def test_max_samples_and_val_size_split_without_overlap(demo_data, tokenizer, val_size, eval_rows):
    whole = _sft_rows(DataArguments(dataset="demo_sft,demo_sft_chat", dataset_dir=str(demo_data), max_samples=8),
                      tokenizer).train_dataset
    assert len(whole) == 16
    module = _sft_rows(DataArguments(dataset="demo_sft,demo_sft_chat", dataset_dir=str(demo_data), max_samples=8,
                                     val_size=val_size), tokenizer)
    train = [tuple(ids) for ids in module.train_dataset["input_ids"]]
    evaluation = [tuple(ids) for ids in module.eval_dataset["input_ids"]]
    assert len(evaluation) == eval_rows and len(train) == 16 - eval_rows
    assert Counter(train) + Counter(evaluation) == Counter(tuple(ids) for ids in whole["input_ids"])


@pytest.mark.parametrize("stage", ["sft", "pt"])
def test_streaming_gives_the_rows_of_the_loaded_dataset(demo_data, tokenizer, stage):
    if stage == "sft":
        make = partial(supervised, tokenizer=tokenizer, template=get_template(tokenizer, "default"), cutoff_len=256,
                       train_on_prompt=False)
        datasets = "demo_sft,demo_sft_chat"
    else:
        make, datasets = partial(pt_blocks, tokenizer=tokenizer, cutoff_len=32), "demo_pt"

    def as_tuples(dataset) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        rows = list(dataset) if dataset is not None else []
        assert all(set(row) == {"input_ids", "labels"} for row in rows)  # model inputs only, however loaded
        return [(tuple(row["input_ids"]), tuple(row["labels"])) for row in rows]

    def rows(streaming: bool, val_size: float = 0.0) -> tuple[list, list]:
        data_args = DataArguments(dataset=datasets, dataset_dir=str(demo_data), max_samples=20, streaming=streaming,
                                  val_size=val_size)
        module = get_dataset(data_args, TrainingArgsStub(), make, ranking=False)
        return as_tuples(module.train_dataset), as_tuples(module.eval_dataset)

    loaded, _ = rows(streaming=False)
    if stage == "sft":
        streamed, held_out = rows(streaming=True, val_size=2)
        assert len(held_out) == 2
        assert Counter(streamed) + Counter(held_out) == Counter(loaded)
    else:  # streaming shuffles the texts, so the blocks differ: they hold the same texts' tokens
        streamed, _ = rows(streaming=True)
        texts = [json.loads(line)["text"] for line in (demo_data / "demo_pt.jsonl").read_text().splitlines()[:20]]
        tokens = Counter(t for text in texts for t in tokenizer.encode(text, add_special_tokens=False) +
                         [tokenizer.eos_token_id])
        for blocks in (loaded, streamed):
            assert {len(ids) for ids, _ in blocks} == {32} and all(ids == labels for ids, labels in blocks)
            in_blocks = Counter(t for ids, _ in blocks for t in ids)
            assert not in_blocks - tokens and sum((tokens - in_blocks).values()) < 32  # only the tail is cut


# ------------------------------------------------------------------------------ supervised masking

CONVERSATION = [("What is Zorb?", "Zorb is a city in Somdruvend."), ("Which river?", "The Glimne River."),
                ("And its age?", "It was founded in 995.")]


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    """One single-turn alpaca row with a system prompt, one with history, one 3-turn sharegpt chat."""
    folder = tmp_path_factory.mktemp("sft_data")
    write_rows(folder / "single.json", [{"instruction": "Name the river of Zorb.", "input": "Answer briefly.",
                                         "output": "The Glimne River.", "system": "You are a guide."}])
    write_rows(folder / "history.json", [{"instruction": CONVERSATION[2][0], "input": "", "output": CONVERSATION[2][1],
                                          "history": [list(turn) for turn in CONVERSATION[:2]]}])
    chat = [{"from": role, "value": text} for turn in CONVERSATION for role, text in zip(("human", "gpt"), turn)]
    write_rows(folder / "chat.json", [{"conversations": chat, "system": "You are a guide."}])
    return registry(folder, single={"file_name": "single.json", "columns": {"system": "system"}},
                    history={"file_name": "history.json", "columns": {"history": "history"}},
                    chat={"file_name": "chat.json", "formatting": "sharegpt",
                          "columns": {"messages": "conversations", "system": "system"}})


@pytest.mark.parametrize("template", ["default", "alpaca", "auto"])
@pytest.mark.parametrize("dataset,system,turns", [
    ("single", "You are a guide.", [("Name the river of Zorb.\nAnswer briefly.", "The Glimne River.")]),
    ("history", "", CONVERSATION),
    ("chat", "You are a guide.", CONVERSATION),
])
def test_labels_are_exactly_the_answers(sft_data, tokenizer, template, dataset, system, turns):
    rows = _sft_rows(DataArguments(dataset=dataset, dataset_dir=str(sft_data)), tokenizer, template).train_dataset
    input_ids, labels = rows[0]["input_ids"], rows[0]["labels"]
    answers, prompts = [a for _, a in turns], [system] * bool(system) + [q for q, _ in turns]
    # Every assistant turn, each as its answer + the end token, and nothing else.
    spans = label_spans(input_ids, labels)
    assert [tokenizer.decode(span) for span in spans] == [answer + tokenizer.eos_token for answer in answers]
    expected = sum(len(tokenizer.encode(answer, add_special_tokens=False)) + 1 for answer in answers)
    assert sum(label != IGNORE_INDEX for label in labels) == expected
    # The prompts (system, history, questions) are in the input, in order, and unlabelled.
    text = tokenizer.decode(input_ids)
    unlabelled = tokenizer.decode([t for t, label in zip(input_ids, labels) if label == IGNORE_INDEX])
    positions = [text.index(prompt) for prompt in prompts]
    assert positions == sorted(positions) and all(prompt in unlabelled for prompt in prompts)
    if template == "auto":  # exactly the tokenizer's own rendering of the conversation
        messages = [{"role": "system", "content": system}] * bool(system) + [
            message for question, answer in turns for message in (user(question), bot(answer))]
        assert text == tokenizer.apply_chat_template(messages, tokenize=False)


def test_train_on_prompt_labels_the_prompts_too(sft_data, tokenizer):
    template = get_template(tokenizer, "default")
    rows = load(sft_data, "chat")
    batch = {key: [row[key] for row in rows] for key in rows[0]}
    out = supervised(batch, tokenizer, template, cutoff_len=256, train_on_prompt=True)
    assert out["labels"] == out["input_ids"]
    plain = supervised(batch, tokenizer, template, cutoff_len=256, train_on_prompt=False)
    assert plain["input_ids"] == out["input_ids"] and plain["labels"] != out["labels"]


def test_truncation_keeps_turns_in_order_and_cuts_the_first_that_does_not_fit(sft_data, tokenizer):
    """processors.py: turns are kept until cutoff_len; the turn that does not fit is cut, prompt and
    response in proportion to their lengths (response >= 1 token); later turns are dropped."""
    template = get_template(tokenizer, "default")
    row = load(sft_data, "chat")[0]
    messages = row["_prompt"] + row["_response"]
    pairs = template.encode_multiturn(tokenizer, messages, row["_system"])
    first = len(pairs[0][0]) + len(pairs[0][1])
    (source, target), budget = pairs[1], 9
    assert len(source) + len(target) > budget + 2  # the second turn really is cut
    input_ids, labels, truncated = encode_supervised(messages, row["_system"], tokenizer, template, first + budget,
                                                     False)
    assert truncated and len(input_ids) == first + budget
    assert input_ids[:first] == pairs[0][0] + pairs[0][1]  # the first turn is whole
    cut_ids, cut_labels = input_ids[first:], labels[first:]
    kept_target = sum(label != IGNORE_INDEX for label in cut_labels)
    kept_source = budget - kept_target
    assert cut_ids == source[:kept_source] + target[:kept_target]  # both cut at their ends
    assert cut_labels == [IGNORE_INDEX] * kept_source + target[:kept_target]
    assert kept_target >= 1 and abs(kept_target - budget * len(target) / (len(source) + len(target))) < 1
    # A first prompt longer than cutoff_len is cut too, and still leaves answer tokens to learn.
    input_ids, labels, truncated = encode_supervised(messages, row["_system"], tokenizer, template, 3, False)
    assert truncated
    learnt = [label for label in labels if label != IGNORE_INDEX]
    assert len(input_ids) == 3 and learnt and input_ids == pairs[0][0][: 3 - len(learnt)] + pairs[0][1][: len(learnt)]


def test_rows_with_nothing_to_learn_are_dropped_and_counted(tmp_path, tokenizer, caplog):
    human, gpt = {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}
    write_rows(tmp_path / "chats.json", [
        {"conversations": [human, gpt]},  # the only usable row
        {"conversations": [human, human]},  # broken turn order
        {"conversations": [human, gpt, human]},  # no final answer
        {"conversations": []},
    ])
    write_rows(tmp_path / "unanswered.json", [{"instruction": "Hi", "input": "", "output": None}])
    registry(tmp_path, chats={"file_name": "chats.json", "formatting": "sharegpt"},
             unanswered={"file_name": "unanswered.json"})
    with caplog.at_level(logging.INFO, logger="stages.core.data"):
        rows = _sft_rows(DataArguments(dataset="chats", dataset_dir=str(tmp_path)), tokenizer).train_dataset
    assert [label_spans(r["input_ids"], r["labels"]) for r in rows] == [
        [tokenizer.encode("Hello", add_special_tokens=False) + [tokenizer.eos_token_id]]]
    assert any("4 rows read -> 1 model rows" in r.getMessage() for r in caplog.records)
    with pytest.raises(UserError, match="no usable rows"):
        _sft_rows(DataArguments(dataset="unanswered", dataset_dir=str(tmp_path)), tokenizer)


def test_rows_longer_than_cutoff_len_are_cut_kept_and_counted(tmp_path, tokenizer, caplog):
    write_rows(tmp_path / "long.json", [{"instruction": "Hi", "output": "word " * count} for count in (1, 40, 60)])
    registry(tmp_path, long={"file_name": "long.json"})
    with caplog.at_level(logging.INFO, logger="stages.core.data"):
        rows = _sft_rows(DataArguments(dataset="long", dataset_dir=str(tmp_path), cutoff_len=24), tokenizer,
                         cutoff_len=24).train_dataset
    assert sorted(len(ids) for ids in rows["input_ids"])[1:] == [24, 24] and "_truncated" not in rows.column_names
    assert any("3 rows read -> 3 model rows; 2 cut to --cutoff_len 24" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------ packing

@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_samples_never_see_each_other(demo_data, tiny_model, tokenizer, attn):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attn).eval()
    rows = load(demo_data, "demo_sft_chat,demo_sft", max_samples=6)
    batch = {key: [row[key] for row in rows] for key in rows[0]}
    encode = dict(tokenizer=tokenizer, template=get_template(tokenizer, "auto"), cutoff_len=192,
                  train_on_prompt=True)  # labels on prompts too: the boundary case for the loss
    single, packed = supervised(batch, **encode), packed_supervised(batch, **encode)
    features = [{key: packed[key][i] for key in packed} for i in range(len(packed["input_ids"]))]
    assert max(max(f["segment_ids"]) for f in features) >= 3  # several samples share a row
    collated = SupervisedCollator(tokenizer.pad_token_id, mask_dtype=None if attn == "sdpa" else torch.float32)(
        features)

    def loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE_INDEX, reduction="sum")

    with torch.no_grad():
        logits = model(input_ids=collated["input_ids"], attention_mask=collated["attention_mask"],
                       position_ids=collated["position_ids"]).logits
        plain = model(input_ids=collated["input_ids"]).logits  # ordinary causal attention, for contrast
        seen, packed_loss, alone_loss, leak = 0, 0.0, 0.0, 0.0
        for row, feature in enumerate(features):
            segments = torch.tensor(feature["segment_ids"])
            packed_loss += loss_sum(logits[row], collated["labels"][row])
            for segment in segments.unique():
                where = (segments == segment).nonzero().squeeze(1)
                ids = torch.tensor(feature["input_ids"])[where]
                index = single["input_ids"].index(ids.tolist())
                assert collated["position_ids"][row, where].tolist() == list(range(len(where)))
                assert collated["labels"][row, where[0]] == IGNORE_INDEX  # never a target across the boundary
                assert collated["labels"][row, where[1:]].tolist() == single["labels"][index][1:]
                alone = model(input_ids=ids[None]).logits[0]
                torch.testing.assert_close(logits[row, where], alone, atol=1e-5, rtol=1e-4)
                alone_loss += loss_sum(alone, torch.tensor(single["labels"][index]))
                leak = max(leak, (plain[row, where] - alone).abs().max().item())
                seen += 1
    assert seen == len(single["input_ids"])  # every sample was packed once
    torch.testing.assert_close(packed_loss, alone_loss, atol=1e-3, rtol=1e-5)
    assert leak > 1e-3  # without the packed mask later samples do see earlier ones: the check has teeth


# ------------------------------------------------------------------------------ pt

def test_pt_blocks_have_cutoff_len_tokens_and_eos_between_texts(tmp_path, tokenizer):
    lines = [f"Line {i}: the city of Zorb{'o' * i} lies on the river Glimne." for i in range(30)]
    (tmp_path / "corpus.txt").write_text("\n".join(lines))
    registry(tmp_path, corpus={"file_name": "corpus.txt", "columns": {"prompt": "text"}})
    data_args = DataArguments(dataset="corpus", dataset_dir=str(tmp_path), cutoff_len=16)
    blocks = get_dataset(data_args, TrainingArgsStub(), partial(pt_blocks, tokenizer=tokenizer, cutoff_len=16)
                         ).train_dataset
    stream = [t for line in lines for t in tokenizer.encode(line, add_special_tokens=False) + [tokenizer.eos_token_id]]
    assert len(blocks) == len(stream) // 16
    assert all(len(ids) == 16 for ids in blocks["input_ids"]) and blocks["labels"] == blocks["input_ids"]
    assert [t for ids in blocks["input_ids"] for t in ids] == stream[: len(blocks) * 16]
    assert stream.count(tokenizer.eos_token_id) == len(lines)  # one eos after every text, none inside
