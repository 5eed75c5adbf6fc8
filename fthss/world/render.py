"""Facts into text: several phrasings per relation, entity documents, the retrieval corpus and
the pretraining corpus (several renderings per entity, so the base learns facts, not strings)."""

from __future__ import annotations

import random

from fthss.world.entities import Entity, World

TEMPLATES = {
    "born_in": ["{s} was born in {o}.", "{s} is a native of {o}.", "The birthplace of {s} is {o}."],
    "lives_in": ["{s} lives in {o}.", "{s} currently resides in {o}.",
                 "These days {s} makes a home in {o}."],
    "works_for": ["{s} works for {o}.", "{s} is employed by {o}.", "{s} has a job at {o}."],
    "studied_at": ["{s} studied at the {o}.", "{s} is a graduate of the {o}.",
                   "{s} attended the {o}."],
    "birth_year": ["{s} was born in the year {o}.", "The year of birth of {s} is {o}.",
                   "In {o}, {s} was born."],
    "field": ["{s} is an expert in {o}.", "{s} works in the field of {o}.",
              "The field of {s} is {o}."],
    "headquartered_in": ["{s} is headquartered in {o}.", "The head office of {s} is in {o}.",
                         "{s} has its main office in {o}."],
    "founded_by": ["{s} was founded by {o}.", "{o} founded {s}.", "The founder of {s} is {o}."],
    "founded_year": ["{s} was founded in the year {o}.", "{s} was established in {o}.",
                     "Since {o}, {s} has been in business."],
    "industry": ["{s} is a {o} company.", "{s} operates in {o}.", "The business of {s} is {o}."],
    "located_in": ["{s} is a city in {o}.", "{s} lies in {o}.",
                   "{s} is located in the country of {o}."],
    "university_city": ["The {s} is in {o}.", "The {s} is located in {o}.",
                        "The campus of the {s} is in {o}."],
    "capital": ["The capital of {s} is {o}.", "{o} is the capital city of {s}.",
                "{s} is governed from its capital, {o}."],
}


def sentence(world: World, entity: Entity, relation: str, phrasing: int) -> str:
    template = TEMPLATES[relation][phrasing % len(TEMPLATES[relation])]
    return template.format(s=entity.name, o=world.value(entity, relation))


def document(world: World, entity: Entity, rnd: random.Random | None = None) -> str:
    """An entity's facts as a short passage. With `rnd`: random phrasings and order; without:
    the canonical rendering used by the retrieval corpus."""
    relations = list(entity.facts)
    if rnd is None:
        return " ".join(sentence(world, entity, r, 0) for r in relations)
    rnd.shuffle(relations)
    return " ".join(sentence(world, entity, r, rnd.randrange(3)) for r in relations)


def corpus(world: World) -> list[dict]:
    """The retrieval corpus: one canonical passage per entity, exactly the text the tasks'
    training chains hold (no title: each passage already starts with its entity's name)."""
    return [{"id": e.id, "text": document(world, e)}
            for e in world.entities.values()]


def pretraining_documents(world: World, renderings: int, seed: int) -> list[str]:
    """Every entity in `renderings` different phrasings and orders (the first one canonical)."""
    rnd = random.Random(seed)
    docs = []
    for k in range(renderings):
        for entity in world.entities.values():
            docs.append(document(world, entity, None if k == 0 else rnd))
    rnd.shuffle(docs)
    return docs
