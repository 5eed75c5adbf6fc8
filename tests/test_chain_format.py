"""Reading chains: the authors' keys, our JSONL, and errors that name file, line and field."""

import json
import re
from pathlib import Path

import pytest

from fthss.datafiles import SkipReport
from fthss.layout.chain import ChainFormatError, chain_from_authors, load_chains

DATA = Path(__file__).with_name("data")
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "reference"


def test_authors_single_round_record():
    [first, *_] = load_chains(DATA / "compress_qa_sample.json")
    record = json.loads((DATA / "compress_qa_sample.json").read_text())[0]
    assert first.shared == record["I_ALL"]
    assert [(s.stage, s.input, s.output) for s in first.steps] == [
        ("A", record["I_A"], record["O_A"]), ("B", None, record["O_B"])]
    assert not first.steps[0].input_visible


def test_authors_multi_round_order_is_numeric():
    chains = load_chains(DATA / "memory_reasoning_sample.json")
    longest = max(chains, key=lambda c: len(c.steps))
    assert [s.stage for s in longest.steps] == ["A", "B"] * 5 + ["A"]
    record = {f"O_{r}{s}": f"{r}{s}" for r in range(1, 12) for s in "AB"} | {"I_ALL": "q"}
    outputs = [s.output for s in chain_from_authors(record, "x").steps]
    assert outputs.index("10A") == outputs.index("9B") + 1
    assert outputs[:3] == ["1A", "1B", "2A"]
    assert outputs[-3:] == ["10B", "11A", "11B"]


def test_authors_input_belongs_to_the_stages_first_step():
    record = {"I_ALL": "q", "I_A": "docs", "O_1A": "a1", "O_1B": "b1", "O_2A": "a2"}
    chain = chain_from_authors(record, "x")
    assert [(s.stage, s.input, s.output) for s in chain.steps] == [
        ("A", "docs", "a1"), ("B", None, "b1"), ("A", None, "a2")]


@pytest.mark.skipif(not REFERENCE.is_dir(),
                    reason="the shared reference data is not beside the repo")
def test_the_full_reference_files_load():
    assert len(load_chains(REFERENCE / "compress_qa_hotpotqa_test.json")) == 500
    rounds = load_chains(REFERENCE / "memory_reasoning_comqa_dev.json")
    assert len(rounds) == 301
    assert all(c.steps[0].stage == "A" and c.steps[-1].stage == "A" for c in rounds)
    # the last A output ends with the answer letter, as the README says
    assert all(re.search(r"\[The answer is\]: ?[A-E]\W*$", c.steps[-1].output) for c in rounds)
    assert max(len(c.steps) for c in rounds) == 11


def test_our_jsonl():
    compress, rounds = load_chains(DATA / "chains.jsonl")
    assert compress.id == "compress-1" and compress.steps[1].stop == ["\n"]
    assert [s.stage for s in rounds.steps] == ["A", "B", "A"]
    assert rounds.steps[1].max_new_tokens == 8 and rounds.steps[0].output is None
    assert rounds.steps[0].max_new_tokens is None and rounds.steps[1].stop == ["."]
    assert compress.steps[0].input.startswith("The film") and compress.steps[1].input is None


def test_jsonl_round_trips_through_to_json(tmp_path):
    chains = load_chains(DATA / "chains.jsonl") + load_chains(DATA / "memory_reasoning_sample.json")
    path = tmp_path / "again.jsonl"
    path.write_text("".join(json.dumps(c.to_json()) + "\n" for c in chains))
    assert load_chains(path) == chains


@pytest.mark.parametrize("line, message", [
    ('{"shared": "q", "steps": [{"stage": "A"}]', r":2: malformed JSON"),
    ('{"shared": "q", "steps": [{"stage": "A"}], "extra": 1}',
     r":2: unknown field\(s\) \['extra'\]"),
    ('{"shared": 3, "steps": [{"stage": "A"}]}', r":2: field 'shared' must be a string"),
    ('{"shared": "q", "steps": [{"input": "x"}]}', r":2: steps\[0\]: missing field 'stage'"),
    ('{"shared": "q", "steps": []}', r":2: field 'steps' must be a non-empty list"),
    ('{"shared": "q", "steps": [{"stage": "A", "max_new_tokens": "5"}]}',
     r":2: steps\[0\].max_new_tokens: wrong type str"),
    ('{"shared": "q", "steps": [{"stage": "A", "stop": [""]}]}', r":2: steps\[0\].stop"),
    # the engine reads 0 as "no limit" and always decodes one token: refuse, don't reinterpret
    ('{"shared": "q", "steps": [{"stage": "A", "max_new_tokens": 0}]}',
     r":2: steps\[0\].max_new_tokens: must be >= 1, got 0"),
    ('{"shared": "q", "steps": [{"stage": "A", "max_new_tokens": -3}]}',
     r":2: steps\[0\].max_new_tokens: must be >= 1"),
    ('{"shared": "q", "steps": [{"stage": "A", "max_new_tokens": true}]}',
     r":2: steps\[0\].max_new_tokens: wrong type bool"),
    ('{"shared": "q", "steps": [{"stage": "A", "stop_token_ids": [true]}]}',
     r":2: steps\[0\].stop_token_ids"),
    ('[1, 2]', r":2: expected a JSON object"),
    ('{"shared": "q", "steps": [{"stage": "A", "outptu": "x"}]}',
     r":2: steps\[0\]: unknown field 'outptu'"),
    ('{"shared": "q", "steps": ["A"]}', r":2: steps\[0\]: expected an object"),
    ('{"shared": "q", "steps": [{"stage": "A", "stop_token_ids": [-1]}]}',
     r":2: steps\[0\].stop_token_ids"),
    # a stage name is also a folder name: one that could lead elsewhere is refused
    ('{"shared": "q", "steps": [{"stage": "../../etc"}]}',
     r":2: steps\[0\].stage: '../../etc' is not a stage name"),
    ('{"shared": "q", "steps": [{"stage": ""}]}', r":2: steps\[0\].stage: '' is not a stage name"),
    ('{"shared": "q", "steps": [{"stage": "A", "output": ""}]}', r":2: steps\[0\].output: empty"),
    ('{"shared": "q", "steps": [{"stage": "A", "output": " \\n"}]}',
     r":2: steps\[0\].output: empty"),
    ('{"id": {"x": 1}, "shared": "q", "steps": [{"stage": "A"}]}',
     r":2: field 'id' must be a string or an integer"),
    ('[' * 100_000 + ']' * 100_000, r":2: malformed JSON: nested too deeply"),
    ('{"shared": "q", "steps": [{"stage": "A", "max_new_tokens": 1' + '0' * 5000 + '}]}',
     r":2: malformed JSON: .*digits"),
])
def test_jsonl_errors_name_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"shared": "ok", "steps": [{"stage": "A"}]}\n' + line + "\n")
    with pytest.raises(ChainFormatError, match=r"bad\.jsonl" + message):
        load_chains(path)


@pytest.mark.parametrize("records, message", [
    ([{"I_ALL": "q", "O_A": "a", "X": "y"}], r"record 0: unknown field 'X'"),
    ([{"I_ALL": "q", "O_A": "a"}, {"I_ALL": "q", "I_C": "doc", "O_A": "a"}],
     r"record 1: input for stage\(s\) \['C'\] with no output"),
    ([{"I_ALL": "q"}], r"record 0: no output field"),
    ([{"I_ALL": "q", "O_A": 5}], r"record 0: field 'O_A' must be a string"),
    ({"I_ALL": "q"}, r"expected a JSON list"),
    ([{"I_ALL": 3, "O_A": "a"}], r"record 0: field 'I_ALL' must be a string"),
    ([{"I_ALL": "q", "O_A": "a"}, "text"], r"record 1: expected a JSON object"),
    ([{"I_ALL": "q", "O_A": "a", "O_B": ""}], r"record 0: field 'O_B' is empty"),
])
def test_authors_errors_name_file_record_and_field(tmp_path, records, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records))
    with pytest.raises(ChainFormatError, match=r"bad\.json: " + message):
        load_chains(path)


def test_authors_malformed_json_names_the_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n {"I_ALL": "q", "O_A": "a"},\n {"I_ALL": "q" "O_A": "a"}\n]\n')
    with pytest.raises(ChainFormatError, match=r"bad\.json:3: malformed JSON"):
        load_chains(path)


def test_missing_file(tmp_path):
    with pytest.raises(ChainFormatError, match=r"nope\.jsonl: cannot read"):
        load_chains(tmp_path / "nope.jsonl")


def test_a_line_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"shared": "q", "steps": [{"stage": "A"}]}\n{"shared": "\xff"}\n')
    with pytest.raises(ChainFormatError, match=r"bad\.jsonl:2: not UTF-8 text \(byte 0xff\)"):
        load_chains(path)


def test_lines_end_at_newlines_only(tmp_path):
    # U+2028, U+0085 and a form feed may stand unescaped in a JSON string; str.splitlines
    # would cut the record at each of them
    path = tmp_path / "odd.jsonl"
    text = "a\u2028b\x85c\x0cd\x1ce"
    path.write_text(json.dumps({"shared": text, "steps": [{"stage": "A"}]}, ensure_ascii=False)
                    + "\r\n\n", encoding="utf-8")
    [chain] = load_chains(path)
    assert chain.shared == text


def test_each_sample_knows_where_it_came_from(tmp_path):
    [compress, rounds] = load_chains(DATA / "chains.jsonl")
    assert (compress.source, rounds.source) == (f"{DATA / 'chains.jsonl'}:1",
                                                f"{DATA / 'chains.jsonl'}:2")
    [first, second, *_] = load_chains(DATA / "compress_qa_sample.json")
    assert (first.source, second.source) == (f"{DATA / 'compress_qa_sample.json'}: record 0",
                                             f"{DATA / 'compress_qa_sample.json'}: record 1")
    assert "source" not in compress.to_json()  # not part of the format


GOOD = '{"shared": "q", "steps": [{"stage": "A", "output": "a"}]}'


def test_bad_records_are_skipped_and_reported_with_file_line_and_reason(tmp_path, capsys):
    path = tmp_path / "mixed.jsonl"
    wrong_type = '{"shared": "q", "steps": [{"stage": "A", "output": 3}]}'
    lines = [GOOD, "{oops", GOOD, wrong_type, "", '{"steps": [{"stage": "B"}]}']
    path.write_text("".join(line + "\n" for line in lines))
    with pytest.raises(ChainFormatError, match=r"mixed\.jsonl:2: malformed JSON"):
        load_chains(path)
    skips = SkipReport()
    chains = load_chains(path, skips)
    assert [c.source for c in chains] == [f"{path}:1", f"{path}:3", f"{path}:6"]
    assert skips.skipped == 2
    assert capsys.readouterr().err.splitlines() == [
        f"skipped {path}:2: malformed JSON: Expecting property name enclosed in double quotes",
        f"skipped {path}:4: steps[0].output: wrong type int"]


def test_bad_records_of_the_authors_format_are_skipped(tmp_path):
    path = tmp_path / "authors.json"
    path.write_text(json.dumps([{"I_ALL": "q", "O_A": "a"}, {"I_ALL": "q", "X": "y"}, 7,
                                {"I_ALL": "r", "O_A": "b"}]))
    errors = []
    chains = load_chains(path, errors.append)
    assert [c.shared for c in chains] == ["q", "r"]
    assert [str(e) for e in errors] == [
        f"{path}: record 1: unknown field 'X' (expected I_ALL, I_<stage>, O_<stage> or "
        + "O_<round><stage>)", f"{path}: record 2: expected a JSON object, got int"]
    path.write_text('[{"I_ALL": "q", "O_A": "a"},')  # the document itself is broken: no skipping
    with pytest.raises(ChainFormatError, match=r"authors\.json:1: malformed JSON"):
        load_chains(path, errors.append)
