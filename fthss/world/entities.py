"""A synthetic world, seeded: entities of several types and the facts that link them.

Everything the demo needs is generated from it (documents, a retrieval corpus, the four tasks),
so the project runs offline. Names are built from syllables, and first names and surnames are
drawn from small pools on purpose: many people share a first name or a surname with others,
which makes distractor passages that share names and relation types.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

_SYLLABLES = ("ka la mo ri su te vo na pe li do ra mi ze to bu ha ne so ki va lo de fi "
              "ma ro ti nu sa ge").split()
FIRST_NAMES = ("Ada Bela Cyrus Dara Emil Fina Gus Hana Ivo Jana Kian Lena Milo Nora Omar Pia "
               "Quin Rosa Sami Tara Uma Vito Wren Xena Yuri Zora Arlo Bree Cato Dina").split()
INDUSTRIES = ("shipping software textiles mining banking aviation publishing robotics "
              "brewing pharmacy").split()
FIELDS = "physics history botany music law medicine chemistry poetry".split()

RELATIONS = {  # relation: (subject type, object type or "year"/"text")
    "born_in": ("person", "city"),
    "lives_in": ("person", "city"),
    "works_for": ("person", "company"),
    "studied_at": ("person", "university"),
    "birth_year": ("person", "year"),
    "field": ("person", "text"),
    "headquartered_in": ("company", "city"),
    "founded_by": ("company", "person"),
    "founded_year": ("company", "year"),
    "industry": ("company", "text"),
    "located_in": ("city", "country"),
    "university_city": ("university", "city"),
    "capital": ("country", "city"),
}


@dataclass
class Entity:
    id: str
    type: str  # person, city, country, company, university
    name: str
    facts: dict[str, str | int] = field(default_factory=dict)  # relation -> entity id or value


@dataclass
class World:
    seed: int
    entities: dict[str, Entity]

    def of_type(self, kind: str) -> list[Entity]:
        return [e for e in self.entities.values() if e.type == kind]

    def value(self, entity: Entity, relation: str) -> str:
        """A fact's object as text: an entity's name, or the value itself."""
        obj = entity.facts[relation]
        return (self.entities[obj].name if isinstance(obj, str) and obj in self.entities
                else str(obj))


def _word(rnd: random.Random, syllables: int) -> str:
    return "".join(rnd.choice(_SYLLABLES) for _ in range(syllables)).capitalize()


def _unique(rnd, count, make, taken):
    names = []
    while len(names) < count:
        name = make()
        if name not in taken:
            taken.add(name)
            names.append(name)
    return names


def build_world(seed: int = 0, people: int = 600, cities: int = 150, countries: int = 40,
                companies: int = 150, universities: int = 60) -> World:
    rnd = random.Random(seed)
    taken: set[str] = set()
    surnames = _unique(rnd, max(20, people // 8), lambda: _word(rnd, 2), taken)
    country_names = _unique(
        rnd, countries, lambda: _word(rnd, 2) + rnd.choice(["ia", "land", "stan", "ora"]), taken)
    city_names = _unique(
        rnd, cities,
        lambda: _word(rnd, 2) + rnd.choice(["ford", "burg", "ton", "vik", "polis", ""]), taken)
    company_names = _unique(
        rnd, companies,
        lambda: _word(rnd, 2) + " " + rnd.choice(["Corp", "Labs", "Works", "Systems", "Group"]),
        taken)
    entities: dict[str, Entity] = {}

    def add(kind, name):
        entity = Entity(f"{kind}-{sum(e.type == kind for e in entities.values())}", kind, name)
        entities[entity.id] = entity
        return entity

    country_list = [add("country", n) for n in country_names]
    city_list = [add("city", n) for n in city_names]
    for i, city in enumerate(city_list):  # every country gets at least one city
        city.facts["located_in"] = (country_list[i % countries].id if i < countries
                                    else rnd.choice(country_list).id)
    for country in country_list:
        country.facts["capital"] = rnd.choice(
            [c for c in city_list if c.facts["located_in"] == country.id]).id
    uni_names = _unique(
        rnd, universities,
        lambda: rnd.choice(["University of ", "Institute of "]) + rnd.choice(city_list).name,
        taken)
    for name in uni_names:
        add("university", name).facts["university_city"] = rnd.choice(city_list).id
    person_names = _unique(
        rnd, people, lambda: f"{rnd.choice(FIRST_NAMES)} {rnd.choice(surnames)}", taken)
    person_list = [add("person", n) for n in person_names]
    company_list = [add("company", n) for n in company_names]
    university_list = [e for e in entities.values() if e.type == "university"]
    for company in company_list:
        company.facts.update(headquartered_in=rnd.choice(city_list).id,
                             founded_by=rnd.choice(person_list).id,
                             founded_year=rnd.randint(1850, 2015),
                             industry=rnd.choice(INDUSTRIES))
    for person in person_list:
        person.facts.update(born_in=rnd.choice(city_list).id, lives_in=rnd.choice(city_list).id,
                            works_for=rnd.choice(company_list).id,
                            studied_at=rnd.choice(university_list).id,
                            birth_year=rnd.randint(1900, 2000), field=rnd.choice(FIELDS))
    return World(seed, entities)
