"""Fuzzing (hypothesis) the data loaders and the layout builder.

Whatever a file holds (broken JSON, bytes that are not UTF-8, wrong types, missing or unknown
keys), a loader returns records or raises its documented error, whose message starts with the
file; with `on_bad` it raises for no record and accounts for every one. Any chain, however
odd its text, lays out with every real token seeing at least itself. Over 1,000 cases in all.
"""

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fthss.layout.chain import (
    ChainFormatError,
    ChainSample,
    Step,
    is_stage_name,
    load_chains,
)
from fthss.layout.sequence import SegmentCodec, build_layout
from fthss.models.presets import byte_tokenizer
from fthss.retrieval.bm25 import BM25Retriever, CorpusFormatError
from fthss.tasks import TASKS, get_task

TEXT = st.text(st.characters(codec="utf-8"), max_size=6)
# what a hostile file holds besides: lone surrogates (JSON "\ud800" escapes), numbers past any
# model (2**63 overflows a tensor)
HOSTILE_TEXT = TEXT | st.sampled_from(["\ud800", "x\udfff", "\udc80y"])
COUNT = st.integers(-1, 4) | st.sampled_from([2**31, 2**63, 2**64])
JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 300) | st.floats() | TEXT,
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(TEXT, inner, max_size=3), max_leaves=6)
STAGES = st.sampled_from(["A", "B", "A", "B", "c-1", "../x", ""])
STEP = st.fixed_dictionaries({"stage": STAGES}, optional={
    "input": st.none() | HOSTILE_TEXT, "output": st.none() | HOSTILE_TEXT,
    "input_visible": st.booleans(), "max_new_tokens": st.none() | COUNT,
    "stop": st.lists(HOSTILE_TEXT, max_size=2), "stop_token_ids": st.lists(COUNT, max_size=2),
    "min_new_tokens": COUNT})
RECORD = st.fixed_dictionaries({"steps": st.lists(STEP, max_size=4)},
                               optional={"id": st.text(max_size=3) | st.integers(),
                                         "shared": HOSTILE_TEXT})


@st.composite
def mutated(draw, record):
    """A record, maybe with a key dropped, added, or given any JSON value (a step's too)."""
    value = draw(record)
    target = value
    if isinstance(value.get("steps"), list) and value["steps"] and draw(st.booleans()):
        target = draw(st.sampled_from(value["steps"]))
    how = draw(st.sampled_from(["keep", "keep", "drop", "add", "retype"]))
    if how == "drop" and target:
        del target[draw(st.sampled_from(sorted(target)))]
    elif how == "add":
        target[draw(TEXT)] = draw(JSON)
    elif how == "retype" and target:
        target[draw(st.sampled_from(sorted(target)))] = draw(JSON)
    return value if draw(st.integers(0, 9)) else draw(JSON)  # now and then not an object


@st.composite
def lines(draw, record):
    """A JSON line, maybe cut short, with bytes inserted, or replaced by raw bytes."""
    # written raw (not as \u escapes), a lone surrogate makes bytes that are not UTF-8
    line = json.dumps(draw(mutated(record)), ensure_ascii=draw(st.booleans())).encode(
        "utf-8", "surrogatepass")
    how = draw(st.sampled_from(["keep", "keep", "keep", "cut", "insert", "bytes"]))
    at = draw(st.integers(0, len(line)))
    if how == "cut":
        return line[:at]
    if how == "insert":
        return line[:at] + draw(st.binary(min_size=1, max_size=3)) + line[at:]
    if how == "bytes":
        return draw(st.binary(max_size=12))
    return line


def jsonl_files(record):
    return st.lists(lines(record), max_size=5).map(lambda rows: b"\n".join(rows) + b"\n")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def non_blank_lines(data: bytes) -> int:
    return sum(1 for line in data.split(b"\n") if line.strip())


def load_both_ways(load, path: Path, error: type[ValueError]):
    """Run `load(path, on_bad)` failing on the first bad record, then skipping them. Returns
    what the skipping run read, and the errors it skipped."""
    try:
        load(path, None)
    except error as err:
        assert str(err).startswith(str(path)), err
    skipped = []
    return load(path, skipped.append), skipped


def assert_well_formed(chain: ChainSample):
    assert chain.steps and all(is_stage_name(step.stage) for step in chain.steps)
    assert all(step.output is None or step.output.strip() for step in chain.steps)
    assert all(isinstance(step.stop_token_ids, list) for step in chain.steps)
    assert all(0 <= t < 2**31 for step in chain.steps for t in step.stop_token_ids)
    assert all(step.min_new_tokens < 2**31 and (step.max_new_tokens or 0) < 2**31
               for step in chain.steps)
    json.dumps(chain.to_json(), ensure_ascii=False).encode("utf-8")  # valid Unicode throughout


@settings(max_examples=300)
@given(data=jsonl_files(RECORD))
def test_jsonl_chains(folder, data):
    path = folder / "chains.jsonl"
    path.write_bytes(data)
    chains, skipped = load_both_ways(load_chains, path, ChainFormatError)
    assert len(chains) + len(skipped) == non_blank_lines(data)
    assert all(str(err).startswith(f"{path}:") for err in skipped)
    for chain in chains:
        assert_well_formed(chain)


AUTHORS_KEY = st.sampled_from(["I_ALL", "I_A", "I_B", "O_A", "O_B", "O_1A", "O_1B", "O_2A",
                               "O_", "X", "I_"])
AUTHORS = st.dictionaries(AUTHORS_KEY, HOSTILE_TEXT | JSON, max_size=5)


@settings(max_examples=200)
@given(records=st.lists(AUTHORS | JSON, max_size=4), cut=st.none() | st.integers(0, 60))
def test_authors_json_chains(folder, records, cut):
    path = folder / "authors.json"
    text = json.dumps(records)
    path.write_text(text if cut is None else text[:cut])
    try:
        chains, skipped = load_both_ways(load_chains, path, ChainFormatError)
    except ChainFormatError as err:  # the document itself does not parse: nothing to skip
        assert cut is not None and str(err).startswith(f"{path}:")
        return
    assert len(chains) + len(skipped) == len(records)
    for chain in chains:
        assert_well_formed(chain)


@pytest.mark.parametrize("task", sorted(TASKS))
@settings(max_examples=60)
@given(data=jsonl_files(RECORD))
def test_task_records(folder, task, data):
    path = folder / f"{task}.jsonl"
    path.write_bytes(data)
    records, skipped = load_both_ways(get_task(task).records, path, ChainFormatError)
    assert len(records) + len(skipped) == non_blank_lines(data)


TEST_RECORD = st.fixed_dictionaries({"question": HOSTILE_TEXT | JSON},
                                    optional={"answer": st.sampled_from("ABEbX ") | JSON,
                                              "id": JSON})


@settings(max_examples=60)
@given(records=st.lists(TEST_RECORD | JSON, min_size=1, max_size=4))
def test_memory_reasoning_test_records(folder, records):
    path = folder / "test.json"
    path.write_text(json.dumps(records))
    loaded, skipped = load_both_ways(get_task("memory_reasoning").records, path,
                                     ChainFormatError)
    first = next((r for r in records if isinstance(r, dict)), None)
    if first is not None and "question" in first:  # read as the test format
        assert len(loaded) + len(skipped) == len(records)
        assert all(r.answer in tuple("ABCDE") for r in loaded)


PASSAGE = st.fixed_dictionaries({"id": st.text(max_size=3), "text": HOSTILE_TEXT},
                                optional={"title": st.none() | TEXT})


@settings(max_examples=100)
@given(data=jsonl_files(PASSAGE))
def test_corpus(folder, data):
    path = folder / "corpus.jsonl"
    path.write_bytes(data)
    skipped = []
    try:
        corpus = BM25Retriever.from_file(path, skipped.append)
    except CorpusFormatError as err:  # only the file as a whole: no passage with a word left
        assert str(err).startswith(f"{path}: ") and ("corpus" in str(err) or "word" in str(err))
        return
    assert len(corpus.ids) + len(skipped) == non_blank_lines(data)
    assert all(str(err).startswith(f"{path}:") for err in skipped)


CODEC = SegmentCodec(byte_tokenizer())
NAMES = ["A", "B", "C"]


@st.composite
def chains(draw):
    steps = draw(st.lists(st.builds(Step, st.sampled_from(NAMES), st.none() | TEXT, TEXT,
                                    st.booleans()), min_size=1, max_size=4))
    return ChainSample(draw(TEXT), steps)


@settings(max_examples=300)
@given(batch=st.lists(chains(), min_size=1, max_size=3),
       prompt_lengths=st.lists(st.integers(1, 4), min_size=3, max_size=3))
def test_every_real_token_sees_itself(batch, prompt_lengths):
    layout = build_layout([CODEC.encode(c) for c in batch], {n: i for i, n in enumerate(NAMES)},
                          prompt_lengths, pad_id=CODEC.pad_id)
    mask, prompt = layout.mask[:, 0], layout.prompt.length
    assert mask.any(dim=-1).all()  # no empty row, padding included
    itself = mask[:, :, prompt:].diagonal(dim1=1, dim2=2)  # [batch, tokens]
    assert itself[layout.meta.is_real].all()
