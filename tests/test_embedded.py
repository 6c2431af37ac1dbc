"""The embedded default (stages.world): world, datasets, tokenizer, tiny model, CLI."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

import stages.world as embedded
from stages.core.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


def _rows(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()] if path.suffix == ".jsonl" else json.loads(text)


def _all_text(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return " ".join(_all_text(v) for v in value.values())
    if isinstance(value, list):
        return " ".join(_all_text(v) for v in value)
    return ""


# ------------------------------------------------------------------------------ world

def test_world_is_deterministic_for_a_seed_and_differs_for_another(tmp_path):
    first, again = embedded.generate_world(0, 30), embedded.generate_world(0, 30)
    assert dataclasses.asdict(first) == dataclasses.asdict(again)
    other = embedded.generate_world(1, 30)
    assert [e.name for e in first.entities] != [e.name for e in other.entities]
    # The files, not only the objects, are identical byte for byte.
    embedded.write_demo_data(tmp_path / "a", first)
    embedded.write_demo_data(tmp_path / "b", again)
    embedded.write_demo_data(tmp_path / "c", other)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "demo_pt.jsonl").read_bytes() != (tmp_path / "c" / "demo_pt.jsonl").read_bytes()


def test_world_is_consistent_and_scales():
    world = embedded.generate_world(3, 50)
    assert len(world.entities) == 50
    names = [e.name for e in world.entities]
    assert len(set(names)) == len(names)
    cities = {e.name: e for e in world.of_kind("city")}
    for person in world.of_kind("person"):
        city = cities[person.fact("birthplace").value]
        assert person.fact("country").value == city.fact("country").value
        assert int(person.fact("birth_year").value) > int(city.fact("founded").value)
    assert {e.split for e in world.of_kind("city")} == {"train", "test"}
    assert {e.split for e in world.of_kind("person")} == {"train", "test"}
    small = embedded.build_datasets(embedded.generate_world(3, 20))
    large = embedded.build_datasets(world)
    assert all(len(large[name]) > len(small[name]) for name in large)
    with pytest.raises(UserError):
        embedded.generate_world(0, 2)


def test_held_out_facts_stay_out_of_the_training_sets():
    world = embedded.generate_world(0, 40)
    data = embedded.build_datasets(world)
    training_text = " ".join(_all_text(data[name]) for name in ("demo_pt", "demo_sft", "demo_sft_chat", "demo_rag",
                                                                    "demo_pref"))
    held_out = [e for e in world.entities if e.split == "test"]
    for entity in held_out:
        # Inventions and rivers are unique made-up words: they name exactly one fact.
        for relation in ("invention", "river"):
            if entity.fact(relation):
                assert entity.fact(relation).value not in training_text, (entity.name, relation)
    test_qa = [r for r in data["demo_qa"] if r["split"] == "test"]
    assert {r["entity_id"] for r in test_qa} == {e.id for e in held_out}
    corpus_ids = {p["id"] for p in data["demo_corpus"]}
    assert corpus_ids == {e.id for e in world.entities}


# ---------------------------------------------------------------------------- datasets

def test_every_dataset_info_entry_has_its_file_and_columns(demo_data):
    info = json.loads((demo_data / "dataset_info.json").read_text())
    assert set(info) == {"demo_pt", "demo_sft", "demo_sft_chat", "demo_augment", "demo_rag", "demo_pref",
                         "demo_corpus", "demo_qa"}
    for name, entry in info.items():
        path = demo_data / entry["file_name"]
        assert path.is_file(), name
        rows = _rows(path)
        assert rows, name
        if entry.get("formatting") == "sharegpt":
            declared = list(entry["columns"].values())
        elif name == "demo_qa":
            declared = ["test_id", "question", "answer", "passages"]
        else:  # alpaca: declared columns, or LLaMA-Factory's defaults
            declared = list(entry.get("columns", {"prompt": "instruction", "query": "input",
                                                  "response": "output"}).values())
        for row in rows:
            assert set(declared) <= set(row), (name, row)
            assert all(isinstance(row[c], (str, list, int)) for c in declared), (name, row)
    # The augmentation rows are what dyprag.qa_generation asks and accepts: the original prompts,
    # replies that parse into three QA pairs about the passage's entity.
    from dyprag.prompts import REWRITE_PROMPT
    from dyprag.qa_generation import parse_qa, qa_prompt

    augment = _rows(demo_data / "demo_augment.json")
    qa_rows = [r for r in augment if r["instruction"].startswith(qa_prompt("").split("Passage:")[0])]
    assert qa_rows and len(qa_rows) * 2 == len(augment)
    for row in qa_rows:
        qa = parse_qa(row["output"], 3)
        assert qa is not None and all(pair["answer"] in row["instruction"] for pair in qa), row
    assert all(r["instruction"].startswith(REWRITE_PROMPT.split("{")[0]) for r in augment if r not in qa_rows)
    for row in _rows(demo_data / "demo_sft_chat.json"):
        roles = [turn["from"] for turn in row["conversations"]]
        assert roles[::2] == ["human"] * (len(roles) // 2) and roles[1::2] == ["gpt"] * (len(roles) // 2)
        assert 4 <= len(roles) <= 6 and row["system"]
    for row in _rows(demo_data / "demo_pref.json"):
        assert row["chosen"] != row["rejected"]
    passages = {p["id"]: p["text"] for p in _rows(demo_data / "demo_corpus.jsonl")}
    for record in _rows(demo_data / "demo_qa.json"):
        assert len(record["passages"]) == 3 and record["passages"][0] == passages[record["entity_id"]]
        assert any(alias in record["passages"][0] for alias in record["answer"]), record
        assert record["split"] in ("train", "test")
    total = sum(p.stat().st_size for p in demo_data.iterdir())
    assert total < 600_000, total


def test_cli_data_equals_the_library_data(demo_data, tmp_path):
    # Another process (another PYTHONHASHSEED) wrote the same bytes: no hidden nondeterminism.
    embedded.write_demo_data(tmp_path, embedded.generate_world(0, 40))
    for path in tmp_path.iterdir():
        assert path.read_bytes() == (demo_data / path.name).read_bytes(), path.name


def test_dataset_info_resolves_in_the_project_registry(demo_data):
    from stages.core.data.registry import get_dataset_attrs

    attrs = {a.name: a for a in get_dataset_attrs(["demo_pt", "demo_sft", "demo_sft_chat", "demo_pref"],
                                                  str(demo_data))}
    assert attrs["demo_sft_chat"].formatting == "sharegpt" and attrs["demo_pref"].ranking
    assert all(Path(a.path).is_file() for a in attrs.values())


# --------------------------------------------------------------------------- tokenizer

ROUND_TRIP = ["Alvo Tesk was born in 1843.", "  two  spaces, a\ttab\nand a newline\n",
              "Completely unrelated text: {json: [1, 2.5e-3]} #$%&*!? ~`'\"", "", "x", "Mixed CASE and_under_score"]


def test_tokenizer_round_trips_and_has_its_special_tokens(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert (tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token) == ("<unk>", "<s>", "</s>", "<pad>")
    assert [tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id] == [0, 1, 2, 3]
    assert tok.padding_side == "right"
    for role in embedded.ROLE_TOKENS:
        assert len(tok.encode(role, add_special_tokens=False)) == 1, role
    for text in ROUND_TRIP:
        ids = tok.encode(text)  # add_special_tokens defaults to True: still no bos/eos
        assert tok.decode(ids) == text
        assert tok.bos_token_id not in ids and tok.eos_token_id not in ids
    # The world's vocabulary is learned: a name is a few tokens, not one per letter.
    name = json.loads((tiny_model.parent / "data" / "demo_corpus.jsonl").read_text().splitlines()[0])["title"]
    assert len(tok.encode(name)) < len(name) / 2


def test_chat_template_renders_by_appending(tiny_model):
    from transformers import AutoTokenizer

    from stages.core.data.template import ChatTemplate

    tok = AutoTokenizer.from_pretrained(tiny_model)
    messages = [{"role": "user", "content": "Who is Alvo?"}, {"role": "assistant", "content": "A poet."},
                {"role": "user", "content": "Born where?"}, {"role": "assistant", "content": "In Gonwim."}]
    rendered = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, *messages], tokenize=False)
    assert rendered == ("<s><|system|>\nBe brief.\n<|user|>\nWho is Alvo?\n<|assistant|>\nA poet.</s>"
                        "<|user|>\nBorn where?\n<|assistant|>\nIn Gonwim.</s>")
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<s><|user|>\nWho is Alvo?\n<|assistant|>\n"
    pairs = ChatTemplate().encode_multiturn(tok, messages, "Be brief.")
    assert [tok.decode(answer) for _, answer in pairs] == ["A poet.</s>", "In Gonwim.</s>"]


def test_train_tokenizer_saves_a_loadable_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    texts = embedded.world_texts(embedded.generate_world(5, 10))
    tok = embedded.train_tokenizer(texts, tmp_path, vocab_size=400)
    assert len(tok) <= 400
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.encode(texts[0]) == tok.encode(texts[0]) and loaded.decode(loaded.encode(texts[0])) == texts[0]


# ------------------------------------------------------------------------------- model

def test_tiny_model_loads_with_plain_transformers_and_gives_finite_logits(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    config = model.config
    assert config.model_type == "llama" and config.vocab_size == len(tok)
    assert (config.hidden_size, config.num_hidden_layers, config.tie_word_embeddings) == (64, 2, False)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 3)
    assert list(tiny_model.glob("*.safetensors")) and not list(tiny_model.glob("*.bin"))
    batch = tok(["Alvo Tesk was born in 1843.", "Who?"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], len(tok))
    assert torch.isfinite(logits).all()


def test_model_init_is_deterministic_and_leaves_the_global_rng_alone(tmp_path):
    import torch
    from safetensors.torch import load_file

    tok = embedded.train_tokenizer(embedded.world_texts(embedded.generate_world(0, 10)), tmp_path / "tok", 300)
    state = torch.get_rng_state()
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        count = embedded.build_tiny_model(tok, tmp_path / name, hidden_size=32, num_layers=1, num_heads=2, seed=seed)
        assert count > 0
    assert torch.equal(state, torch.get_rng_state())
    a, b, c = (load_file(tmp_path / n / "model.safetensors") for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].ndim == 2)


def test_tiny_model_learns_the_world(tiny_model, demo_data):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).train()
    stream: list[int] = []
    for row in _rows(demo_data / "demo_pt.jsonl")[:24]:
        stream += tok.encode(row["text"]) + [tok.eos_token_id]
    block = 64
    batch = torch.tensor(stream[: len(stream) // block * block]).view(-1, block)[:4]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):  # from ~ln(vocab) = 7.3 to ~5.3 on an idle CPU
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses


# --------------------------------------------------------------------------------- CLI

def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages.world", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_cli_reuses_a_matching_build_and_refuses_a_different_one(embedded_dir):
    before = (embedded_dir / "model" / "model.safetensors").stat().st_mtime_ns
    again = _cli("--output_dir", str(embedded_dir), "--preset", "tiny", "--num_entities", "40")
    assert again.returncode == 0, again.stderr
    assert "reusing the existing data" in again.stdout and "reusing the existing model" in again.stdout
    assert (embedded_dir / "model" / "model.safetensors").stat().st_mtime_ns == before
    other = _cli("--output_dir", str(embedded_dir), "--preset", "tiny", "--num_entities", "40", "--seed", "7")
    assert other.returncode == 2
    assert "--overwrite" in other.stderr and "Traceback" not in other.stderr


def test_cli_help_lists_every_flag():
    result = _cli("--help")
    assert result.returncode == 0
    for flag in ("--output_dir", "--preset", "--seed", "--num_entities", "--overwrite"):
        assert flag in result.stdout


def test_an_interrupted_build_leaves_no_folder_under_its_final_name(tmp_path):
    def broken(folder: Path) -> None:
        (folder / "half.json").write_text("{")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        embedded.build_into(tmp_path / "data", broken)
    assert list(tmp_path.iterdir()) == []
    embedded.build_into(tmp_path / "data", lambda folder: (folder / "ok.json").write_text("{}"))
    embedded.build_into(tmp_path / "data", lambda folder: (folder / "new.json").write_text("{}"))
    assert [p.name for p in tmp_path.iterdir()] == ["data"]
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["new.json"]
