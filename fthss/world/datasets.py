"""The four tasks' data, generated from the world as chain samples (our JSONL format).

compress_qa       a single-hop question; A reads the entity's passage among distractors that
                  share its name or type, and writes the one sentence that answers; B answers.
rewrite_qa        multi-hop (bridge: the founder's birthplace, the employer's head office;
                  comparison: who was born / what was founded earlier); A writes one search
                  query per line, B answers from the passages retrieved for them.
memory_reasoning  multiple choice over two hops of facts the base read in pretraining (no
                  passages): A reasons, B recalls, A, B, then A answers `[The answer is]: X`.
active_rag        the same multi-hop questions, one retrieval per hop: A writes a query, B
                  reads the passages and writes a note, and finally `answer: ...`.
Question instances are split train/dev/test at random; the world (every entity's facts) is the
same for all splits, as Wikipedia is for HotpotQA.
"""

from __future__ import annotations

import random

from fthss.errors import ConfigError
from fthss.layout.chain import ChainSample, Step
from fthss.world.entities import World
from fthss.world.render import document, sentence

QUESTIONS = {
    "born_in": "Where was {s} born?", "lives_in": "Which city does {s} live in?",
    "works_for": "Which company does {s} work for?", "studied_at": "Where did {s} study?",
    "birth_year": "In which year was {s} born?", "field": "What is the field of {s}?",
    "headquartered_in": "Where is {s} headquartered?", "founded_by": "Who founded {s}?",
    "founded_year": "When was {s} founded?", "industry": "What industry is {s} in?",
    "located_in": "In which country is {s}?", "university_city": "In which city is the {s}?",
    "capital": "What is the capital of {s}?",
}
LETTERS = "ABCDE"


def _distractors(world: World, entity, rnd: random.Random, count: int) -> list:
    """Same-type entities, those sharing a name part first: the passages a retriever confuses."""
    tokens = set(entity.name.split())
    same_type = [e for e in world.of_type(entity.type) if e.id != entity.id]
    sharing = [e for e in same_type if tokens & set(e.name.split())]
    rnd.shuffle(sharing)
    others = rnd.sample(same_type, min(len(same_type), count))
    return list({e.id: e for e in sharing + others}.values())[:count]


def compress_qa(world: World, rnd: random.Random, passages: int = 4) -> list[ChainSample]:
    samples = []
    for entity in world.entities.values():
        for relation in entity.facts:
            docs = [entity] + _distractors(world, entity, rnd, passages - 1)
            rnd.shuffle(docs)
            samples.append(ChainSample(QUESTIONS[relation].format(s=entity.name), [
                Step("A", input="\n".join(document(world, d) for d in docs),
                     output=sentence(world, entity, relation, 0)),
                Step("B", output=world.value(entity, relation))], f"{entity.id}:{relation}"))
    return samples


def _multi_hop(world: World, rnd: random.Random, comparisons: int = 2500):
    """(question, hops, answer): each hop is (query, passage entity, note sentence)."""
    items = []
    for company in world.of_type("company"):
        founder = world.entities[company.facts["founded_by"]]
        items.append((f"Where was the founder of {company.name} born?",
                      [(f"{company.name} founder", company,
                        sentence(world, company, "founded_by", 0)),
                       (f"{founder.name} birthplace", founder,
                        sentence(world, founder, "born_in", 0))],
                      world.value(founder, "born_in"), f"{company.id}:founder-born"))
    for person in world.of_type("person"):
        employer = world.entities[person.facts["works_for"]]
        items.append((f"In which city is the employer of {person.name} headquartered?",
                      [(f"{person.name} employer", person, sentence(world, person, "works_for", 0)),
                       (f"{employer.name} head office", employer,
                        sentence(world, employer, "headquartered_in", 0))],
                      world.value(employer, "headquartered_in"), f"{person.id}:employer-hq"))
    pairs = set()  # one question per unordered pair: no pair in two splits
    comparisons_of = [  # (entities, fact, question, query, tag, share of the comparisons)
        (world.of_type("person"), "birth_year", "Who was born earlier, {a} or {b}?",
         "{x} year of birth", "born-earlier", 4 / 5),
        (world.of_type("company"), "founded_year", "Which company was founded earlier, {a} or {b}?",
         "{x} founded", "founded-earlier", 1 / 5)]
    for entities, fact, question, query, tag, share in comparisons_of:
        for _ in range(int(comparisons * share)):
            a, b = rnd.sample(entities, 2)
            key = tuple(sorted((a.id, b.id)))
            if a.facts[fact] == b.facts[fact] or key in pairs:
                continue
            pairs.add(key)
            earlier = a if a.facts[fact] < b.facts[fact] else b
            items.append((question.format(a=a.name, b=b.name),
                          [(query.format(x=e.name), e, sentence(world, e, fact, 0))
                           for e in (a, b)],
                          earlier.name, f"{a.id}:{b.id}:{tag}"))
    return items


def rewrite_qa(world: World, rnd: random.Random) -> list[ChainSample]:
    return [ChainSample(question, [
        Step("A", output="\n".join(query for query, _, _ in hops)),
        Step("B", input="\n".join(document(world, e) for _, e, _ in hops), output=answer)], key)
        for question, hops, answer, key in _multi_hop(world, rnd)]


def active_rag(world: World, rnd: random.Random) -> list[ChainSample]:
    samples = []
    for question, hops, answer, key in _multi_hop(world, rnd):
        steps = []
        for i, (query, entity, note) in enumerate(hops):
            last = i == len(hops) - 1
            steps += [Step("A", output=query),
                      Step("B", input=document(world, entity),
                           output=f"{note} answer: {answer}" if last else note)]
        samples.append(ChainSample(question, steps, key))
    return samples


_TWO_HOPS = [  # (question, first relation, second relation, option pool type)
    ("In which country was {s} born?", "born_in", "located_in", "country"),
    ("In which country does {s} live?", "lives_in", "located_in", "country"),
    ("What industry is the employer of {s} in?", "works_for", "industry", None),
]


def memory_reasoning(world: World, rnd: random.Random) -> list[ChainSample]:
    from fthss.world.entities import INDUSTRIES

    samples = []
    for person in world.of_type("person"):
        for question, first, second, pool in _TWO_HOPS:
            middle = world.entities[person.facts[first]]
            answer = world.value(middle, second)
            choices = [e.name for e in world.of_type(pool)] if pool else list(INDUSTRIES)
            options = rnd.sample([c for c in choices if c != answer], 4) + [answer]
            rnd.shuffle(options)
            letter = LETTERS[options.index(answer)]
            shown = " ".join(f"{L}.{o}" for L, o in zip(LETTERS, options, strict=True))
            samples.append(ChainSample(
                f"Question: {question.format(s=person.name)} Options: {shown}", [
                    Step("A", output=f"Let's reason: first recall the {first.replace('_', ' ')} "
                                     f"fact about {person.name}."),
                    Step("B", output="Let's recall the knowledge: "
                                     + sentence(world, person, first, 0)),
                    Step("A", output=f"Let's reason: now recall the {second.replace('_', ' ')} "
                                     f"fact about {middle.name}."),
                    Step("B", output="Let's recall the knowledge: "
                                     + sentence(world, middle, second, 0)),
                    Step("A", output=f"So the answer is {answer}, option {letter}. "
                                     f"[The answer is]: {letter}")],
                f"{person.id}:{first}-{second}"))
    return samples


BUILDERS = {"compress_qa": compress_qa, "rewrite_qa": rewrite_qa,
            "memory_reasoning": memory_reasoning, "active_rag": active_rag}
# task -> the task whose questions (and split) it reuses
SAME_QUESTIONS = {"active_rag": "rewrite_qa"}


def split(samples: list[ChainSample], rnd: random.Random, test: int, dev: int
          ) -> dict[str, list[ChainSample]]:
    order = list(samples)
    rnd.shuffle(order)
    if len(order) < test + dev + 1:
        raise ConfigError(f"{len(order)} samples cannot make a test split of {test} and dev "
                          f"of {dev}")
    return {"test": order[:test], "dev": order[test:test + dev], "train": order[test + dev:]}
