"""The demo world: invented people and cities with facts, a pure function of (seed, num_entities).

Names are built from syllables, so no fact can be known from real pre-training. A person has a
birthplace, country, birth year, occupation, favourite colour, invention and (about half) a teacher;
a city a country, founding year, river and speciality. The same seed gives the same world, another
seed another world. About a fifth of the entities are held out (`split == "test"`): their facts reach
only the retrieval corpus and the test questions (stages.world.demo_data), so answering them needs the
passage rather than memory.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..core.errors import UserError

# Syllables for invented names. Onsets/codas are plain ASCII so names tokenize cleanly and
# round-trip; the mix of open and closed syllables gives a few thousand distinct names.
_ONSETS = ["b", "br", "c", "d", "dr", "f", "g", "gl", "h", "j", "k", "kr", "l", "m", "n", "p", "qu", "r",
           "s", "sh", "st", "t", "th", "tr", "v", "w", "z"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ei", "ou", "ia"]
_CODAS = ["", "", "", "n", "r", "l", "s", "th", "m", "nd", "rk", "x"]
_OCCUPATIONS = ["astronomer", "cartographer", "violinist", "botanist", "architect", "glassblower", "poet",
                "engineer", "chemist", "weaver", "sculptor", "physician", "clockmaker", "historian",
                "navigator", "painter"]
COLOURS = ["red", "blue", "green", "amber", "violet", "silver", "teal", "crimson", "ochre", "indigo",
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


def article(word: str) -> str:
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
        occupation, colour = rng.choice(_OCCUPATIONS), rng.choice(COLOURS)
        invention = names.word(1, 2).lower() + rng.choice(_INVENTION_SUFFIXES)
        facts = [
            Fact("birthplace", city.name, (city.name,)),
            Fact("country", country, (country,)),
            Fact("birth_year", str(year), (str(year),)),
            Fact("occupation", occupation, (occupation, f"{article(occupation)} {occupation}")),
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

