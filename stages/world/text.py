"""What the world says: sentences stating its facts, passages, pre-training paragraphs, questions, preferences."""

from __future__ import annotations

import random
from dataclasses import dataclass

from .facts import Entity, Fact, World, article

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
    return templates[variant % len(templates)].format(n=entity.name, v=fact.value, a=article(fact.value))


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
            text = (f"{entity.name} (born {f['birth_year']}) was {article(f['occupation'])} {f['occupation']} "
                    f"from {f['birthplace']}, {f['country']}. {entity.name} is best known as the inventor of the "
                    f"{f['invention']}.")
            if "teacher" in f:
                text += f" {entity.name} studied under {f['teacher']}."
            text += f" {entity.name}'s favourite colour was {f['colour']}."
        else:
            text = " ".join(say(entity, fact) for fact in entity.facts)
            if entity.name in born_in:
                text += f" Notable people born in {entity.name} include {join_names(born_in[entity.name][:3])}."
        passages.append({"id": entity.id, "title": entity.name, "text": text})
    return passages


def join_names(items: list[str]) -> str:
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

