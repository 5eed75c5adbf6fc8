"""Tasks map records to chains, retrieval runs between steps, and `fthss eval` reports every
method on the authors' reference formats (with a tiny random model: scores near zero, but the
pipeline runs and reports)."""

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fthss.engine.engine import END, ChainEngine
from fthss.evaluation.evaluate import MethodResult, compare, evaluate
from fthss.layout.chain import ChainFormatError, ChainSample, Step
from fthss.prompts.stage import Stage, StageConfig
from fthss.tasks import get_task
from fthss.tasks.base import TaskRecord

DATA = Path(__file__).with_name("data")
ROOT = Path(__file__).resolve().parents[1]


def test_compress_qa_requests():
    task = get_task("compress_qa")
    [record, *_] = task.records(DATA / "compress_qa_sample.json")
    raw = json.loads((DATA / "compress_qa_sample.json").read_text())[0]
    assert record.answer == raw["O_B"]
    request = task.request(record)
    assert [(s.stage, s.input, s.output) for s in request.steps] == [
        ("A", raw["I_A"], None), ("B", None, None)]
    gold = task.request(record, gold_upstream=True)
    assert gold.steps[0].output == raw["O_A"] and gold.steps[1].output is None
    assert task.score("the " + raw["O_B"].upper() + "!", record) == {"em": 1.0, "f1": 1.0}


def test_memory_reasoning_reads_both_formats_and_stops_once_answered(tmp_path):
    task = get_task("memory_reasoning", max_rounds=3)
    records = task.records(DATA / "memory_reasoning_sample.json")
    assert all(r.answer in "ABCDE" for r in records)
    assert [s.stage for s in task.request(records[0]).steps] == ["A", "B", "A", "B", "A"]
    longest = max(records, key=lambda r: len(r.sample.steps))
    gold = task.request(longest, gold_upstream=True)
    assert [s.output is None for s in gold.steps] == [False] * (len(gold.steps) - 1) + [True]
    test_file = tmp_path / "test.json"
    test_file.write_text(json.dumps([{"question": "Q? A.x B.y", "answer": "B", "split": "test",
                                      "cot_steps": []}]))
    [test] = task.records(test_file)
    assert (test.answer, test.sample.shared) == ("B", "Q? A.x B.y")
    stop = task.step_input()
    assert stop(task.request(test), 1, ["so [The answer is]: B"]) is END
    assert stop(task.request(test), 1, ["let me think"]) is None
    assert task.score("... [The answer is]: b", test) == {"acc": 1.0}


RETRIEVAL = {"shared": "q", "steps": [{"stage": "A", "output": "q1"},
                                     {"stage": "B", "input": "p", "output": "answer: x"}]}
GOOD = {"compress_qa": {"shared": "q", "steps": [{"stage": "A", "input": "docs", "output": "c"},
                                                 {"stage": "B", "output": "x"}]},
        "rewrite_qa": RETRIEVAL, "active_rag": RETRIEVAL,
        "memory_reasoning": {"shared": "q",
                             "steps": [{"stage": "A", "output": "[The answer is]: B"}]}}


@pytest.mark.parametrize("task, record, message", [
    ("compress_qa", {"shared": "q", "steps": [{"stage": "B", "output": "x"}]},
     "compress_qa needs steps A"),
    ("rewrite_qa", {"shared": "q", "steps": [{"stage": "A", "output": "x"}]},
     "rewrite_qa needs alternating A, B steps ending with B"),
    ("memory_reasoning", {"shared": "q", "steps": [{"stage": "A", "output": "no letter"}]},
     r"the last output has no '\[The answer is\]: X'"),
    ("active_rag", {"shared": "q", "steps": [{"stage": "A", "output": "x"}, {"stage": "B"},
                                             {"stage": "A", "output": "y"}]},
     "active_rag needs alternating A, B steps ending with B"),
])
def test_a_record_that_is_not_the_tasks_chain_is_named_or_skipped(tmp_path, task, record,
                                                                   message):
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (GOOD[task], record, GOOD[task])))
    with pytest.raises(ChainFormatError, match=re.escape(f"{path}:2: ") + message):
        get_task(task).records(path)
    skipped = []
    records = get_task(task).records(path, skipped.append)
    assert len(skipped) == 1 and str(skipped[0]).startswith(f"{path}:2: ")
    assert [r.sample.source for r in records] == [f"{path}:1", f"{path}:3"]


def test_memory_reasoning_test_records_are_checked(tmp_path):
    path = tmp_path / "test.json"
    path.write_text(json.dumps([{"question": "Q? A.x B.y", "answer": "b"},
                                {"question": "Q?", "answer": "maybe"}, ["not", "a", "record"]]))
    task = get_task("memory_reasoning")
    with pytest.raises(ChainFormatError, match=re.escape(f"{path}: record 1: field 'answer' "
                                                         "must be an option letter A-E")):
        task.records(path)
    skipped = []
    [record] = task.records(path, skipped.append)
    assert record.answer == "B"
    assert [str(e).split(": ")[1] for e in skipped] == ["record 1", "record 2"]
    path.write_text('[{"question": "Q?", "answer": "A"}')
    with pytest.raises(ChainFormatError, match=re.escape(f"{path}:1: malformed JSON")):
        task.records(path)


@dataclass
class Hit:
    id: str
    text: str
    score: float = 1.0


class KeywordRetriever:
    """A stand-in retriever: passages that share a word with the query."""

    def __init__(self, passages):
        self.passages = passages

    def search(self, queries, k):
        return [[Hit(str(i), p) for i, p in enumerate(self.passages)
                 if set(q.lower().split()) & set(p.lower().split())][:k] for q in queries]


def test_retrieval_runs_between_steps(llama):
    retriever = KeywordRetriever(["ada was born in oslo", "bob works at acme", "oslo is cold"])
    stages = [Stage.create(StageConfig(n, "prompt", 2), llama, seed=i) for i, n in enumerate("AB")]
    engine = ChainEngine(llama, stages, max_new_tokens=3)
    for name in ("rewrite_qa", "active_rag"):
        task = get_task(name)
        record = TaskRecord("r", ChainSample("where was ada born?", [
            Step("A", output="ada born"), Step("B", input="ada was born in oslo",
                                               output="answer: oslo")]), "oslo")
        # the upstream query is given, so the retrieved passages are known
        [result] = engine.run([task.request(record, gold_upstream=False)],
                              step_input=lambda req, k, outs, task=task: task.step_input(
                                  retriever)(req, k, ["ada born"] if k == 1 else outs))
        assert result.steps[1].input == "ada was born in oslo"
    assert get_task("active_rag").prediction(
        type("R", (), {"output": "so far x. answer: Oslo"})()) == "Oslo"


@pytest.fixture(scope="module")
def method_stages(tmp_path_factory):
    from conftest import get_base

    base = get_base("tiny-llama")
    root = tmp_path_factory.mktemp("methods")
    sets = {}
    for method, names in (("chain", "AB"), ("fthss", "AB"), ("single", ["single"]),
                          ("distill", ["distill"])):
        sets[method] = [Stage.create(StageConfig(n, "prompt", 2), base, seed=len(sets))
                        for n in names]
        for stage in sets[method]:
            stage.save_pretrained(root / method / stage.name, base)
    return base, sets, root


def test_compare_gives_a_minus_b_for_each_pair_present():
    def run(method, gold, em):
        return MethodResult(method, gold, {"em": em}, {}, [], [])
    runs = [run("single", False, [0, 0, 0, 0]), run("chain", False, [1, 1, 0, 0]),
            run("chain", True, [1, 1, 1, 0]), run("fthss", False, [1, 1, 1, 0]),
            run("fthss", True, [1, 0, 0, 0])]  # no fthss-untuned: its comparison is left out
    rows = compare(runs, "em")
    assert [(r["a"], r["b"], r["gold_upstream"], r["diff"]) for r in rows] == [
        ("fthss", "chain", False, 25.0), ("fthss", "chain", True, -50.0),
        ("chain", "single", False, 50.0)]
    for r in rows:
        assert r["metric"] == "em" and r["ci95"][0] <= r["diff"] <= r["ci95"][1]


@pytest.mark.parametrize("task_name, data", [("compress_qa", "compress_qa_sample.json"),
                                             ("memory_reasoning", "memory_reasoning_sample.json")])
def test_evaluate_every_method_on_reference_formats(method_stages, task_name, data):
    base, sets, _ = method_stages
    task = get_task(task_name)
    records = task.records(DATA / data)
    report = evaluate(base, task, records, sets, max_new_tokens=3)
    labels = [(m["method"], m["gold_upstream"]) for m in report["methods"]]
    assert labels == [("single", False), ("distill", False), ("chain", False), ("chain", True),
                      ("fthss-untuned", False), ("fthss-untuned", True), ("fthss", False),
                      ("fthss", True)]
    for row in report["methods"]:
        assert all(0 <= row[m] <= 100 for m in task.metric_names)
        assert row["stages"]  # per-stage latency / prefill / KV statistics
    assert [(c["a"], c["b"], c["gold_upstream"]) for c in report["comparisons"]] == [
        ("fthss", "chain", False), ("fthss", "chain", True), ("chain", "single", False),
        ("fthss", "fthss-untuned", False), ("fthss", "fthss-untuned", True)]
    chain, fthss = (next(m for m in report["methods"]
                         if m["method"] == k and not m["gold_upstream"])
                    for k in ("chain", "fthss"))
    if task_name == "compress_qa":  # the QA stage re-reads the compression only in text mode
        assert chain["stages"]["B"]["prefilled_tokens"] > fthss["stages"]["B"]["prefilled_tokens"]
    # one prediction row per method and request, consistent with the method's metric
    rows = report["predictions"]
    assert len(rows) == len(labels) * len(records)
    for row in report["methods"]:
        mine = [r for r in rows if (r["method"], r["gold_upstream"]) == (row["method"],
                                                                          row["gold_upstream"])]
        assert [r["id"] for r in mine] == [r.id for r in records]
        assert [r["answer"] for r in mine] == [r.answer for r in records]
        main = task.metric_names[0]
        assert 100 * np.mean([r["scores"][main] for r in mine]) == pytest.approx(row[main])
        for r, record in zip(mine, records, strict=True):
            assert r["steps"] and all(set(s) == {"stage", "output"} for s in r["steps"])
            if row["gold_upstream"]:  # the given upstream outputs are what the rows show
                gold = [s.output for s in record.sample.steps[:-1]]
                assert [s["output"] for s in r["steps"][:len(gold)]] == gold


def test_cli_eval_writes_the_report(method_stages, tmp_path, figures):
    from fthss.cli import main

    _, _, root = method_stages
    out = tmp_path / "report"
    assert main(["eval", "--arch", "tiny-llama", "--task", "compress_qa", "--data",
                 str(DATA / "compress_qa_sample.json"), "--stages", f"chain={root / 'chain'}",
                 "--stages", f"fthss={root / 'fthss'}", "--max-new-tokens", "2",
                 "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["tasks"][0]["task"] == "compress_qa" and "predictions" not in report["tasks"][0]
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    records = len(json.loads((DATA / "compress_qa_sample.json").read_text()))
    assert len(rows) == 6 * records  # chain, fthss-untuned, fthss, each also with gold upstream
    assert {r["task"] for r in rows} == {"compress_qa"}
    assert [s["stage"] for s in rows[0]["steps"]] == ["A", "B"]
    # the error-analysis example reads it: one table row per method run with generated upstream
    breakdown = subprocess.run([sys.executable, str(ROOT / "examples" / "breakdown.py"), str(out)],
                               capture_output=True, text=True, check=True).stdout
    assert "## compress_qa (EM %)" in breakdown
    assert [line.split(" | ")[0] for line in breakdown.splitlines()[-3:]] == [
        "| chain", "| fthss-untuned", "| fthss"]
    assert "| fthss (gold upstream) |" in (out / "report.md").read_text()
    with (out / "predictions.jsonl").open("a") as file:
        file.write("{truncated\n")
    bad = subprocess.run([sys.executable, str(ROOT / "examples" / "breakdown.py"), str(out)],
                         check=False, capture_output=True, text=True)
    assert bad.returncode != 0
    assert f"predictions.jsonl:{len(rows) + 1}: not a JSON row" in bad.stderr
    [accuracy] = figures["accuracy.png"]  # one panel per task, one bar per method run
    assert accuracy["title"] == "compress_qa" and accuracy["bars"] == 6
    assert accuracy["xticklabels"][:2] == ["chain", "chain\n(gold)"]
    [tuning] = figures["tuning.png"]
    assert tuning["legend"] == ["fthss-untuned", "fthss"] and tuning["bars"] == 2
    assert main(["eval", "--arch", "tiny-llama", "--task", "compress_qa", "--data",
                 str(DATA / "compress_qa_sample.json"), "--stages", "magic=x", "--out",
                 str(out)]) == 2


def test_cli_eval_skips_bad_records_when_asked(method_stages, tmp_path, capsys):
    from fthss.cli import main

    _, _, root = method_stages
    data, corpus = tmp_path / "test.json", tmp_path / "corpus.jsonl"
    records = json.loads((DATA / "compress_qa_sample.json").read_text())[:2]
    data.write_text(json.dumps([records[0], {"I_ALL": "q", "O_B": "x"}, records[1]]))
    corpus.write_text('{"id": "p1", "text": "Oslo is a city"}\n{"id": "p2"}\n')
    command = ["eval", "--arch", "tiny-llama", "--task", "compress_qa", "--data", str(data),
               "--corpus", str(corpus), "--stages", f"fthss={root / 'fthss'}",
               "--max-new-tokens", "2", "--no-gold-upstream", "--out", str(tmp_path / "out")]
    assert main(command) == 2
    assert f"{data}: record 1: compress_qa needs steps A" in capsys.readouterr().err
    assert main(command + ["--skip-bad"]) == 0
    assert [line for line in capsys.readouterr().err.splitlines()
            if line.startswith(("skipped", "fthss eval"))] == [
        (f"skipped {data}: record 1: compress_qa needs steps A (input: the passages) then B "
         "(output: the answer)"),
        (f"skipped {corpus}:2: need an object with 'id' (a string or an integer) and a string "
         "'text'"),
        "fthss eval: skipped 2 bad record(s), listed above"]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["tasks"][0]["records"] == 2


def test_the_chosen_option_is_the_one_the_answer_names_else_the_letter():
    from fthss.tasks.memory_reasoning import chosen_option

    question = "Question: Where? Options: A.Tipeia B.Malaland C.food processing D.x E.y"
    assert chosen_option("So the answer is Malaland, option A. [The answer is]: A", question) == "B"
    assert chosen_option("the answer is food processing. [The answer is]: A", question) == "C"
    assert chosen_option("So the answer is Paris. [The answer is]: D", question) == "D"
    assert chosen_option("Hence, the correct answer is B. [The answer is]: E", question) == "E"
    assert chosen_option("no answer here", question) is None
    record = TaskRecord("r", ChainSample(question, []), "B")
    assert get_task("memory_reasoning").score("the answer is Malaland. [The answer is]: A",
                                              record) == {"acc": 1.0}


def test_sections_of_two_kinds_merge_into_one_report_with_kind_labels(tmp_path, figures):
    from fthss.evaluation.evaluate import merge_sections
    from fthss.evaluation.report import write_report

    def section(kind, fthss_score):
        runs = [MethodResult("chain", False, {"em": [1.0, 0.0], "f1": [1.0, 0.0]}, {},
                             ["a", "b"], [[], []]),
                MethodResult("fthss", False, {"em": [fthss_score, 0.0], "f1": [1.0, 0.0]}, {},
                             ["a", "c"], [[], []])]
        tag = {"kind": kind}
        return {"task": "compress_qa", "metric": "em_f1", "records": 2,
                "methods": [{**tag, **r.summary()} for r in runs],
                "comparisons": [{**tag, **c} for c in compare(runs, "em")],
                "predictions": [{**tag, "method": r.method} for r in runs]}

    merged = merge_sections([section("prompt", 0.0), section("lora", 1.0)])
    assert [(m["kind"], m["method"]) for m in merged["methods"]] == [
        ("prompt", "chain"), ("prompt", "fthss"), ("lora", "chain"), ("lora", "fthss")]
    assert [(c["kind"], c["diff"]) for c in merged["comparisons"]] == [("prompt", -50.0),
                                                                       ("lora", 0.0)]
    write_report([merged], tmp_path)
    markdown = (tmp_path / "report.md").read_text()
    assert "| prompt fthss | 0.0 | 50.0 |" in markdown and "| lora fthss | 50.0 |" in markdown
    assert "| compress_qa | lora fthss − chain | generated | EM | +0.0 |" in markdown
    [tuning] = figures["tuning.png"]
    assert tuning["legend"] == ["prompt fthss", "lora fthss"]
    with pytest.raises(ValueError, match="one task"):
        merge_sections([section("prompt", 0.0), {**section("lora", 1.0), "records": 3}])
