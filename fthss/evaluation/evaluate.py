"""Evaluate methods on a task: the paper's comparison, on any base and data.

Each method is a set of trained stages and a way to run them:
    single         the `single` stage, one step            (shared mode; one stage, plain causal)
    distill        the `distill` stage runs every step      (shared mode; one prompt)
    chain          stages trained as `chain`, passing text  (text mode)
    fthss          FTHSS-tuned stages, sharing one cache    (shared mode)
    fthss-untuned  stages trained as `chain`, run in shared mode without FTHSS tuning
    adapt          `adapt`-tuned stages                     (shared mode)
With `gold_upstream`, every method with an upstream stage is also run with the gold upstream
outputs given: it separates "can the stage read shared K/V" from "is the upstream stage good".
Every request's step outputs are kept (`predictions` rows, written to predictions.jsonl by the
report), so an error can be traced to the stage that made it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from fthss.engine.engine import ChainEngine
from fthss.errors import EmptyDataError
from fthss.evaluation.metrics import paired_bootstrap
from fthss.models.base import BaseModel
from fthss.prompts.stage import Stage
from fthss.tasks.base import Task, TaskRecord
from fthss.training.methods import method_view

# evaluated method -> (the training method whose stages it runs, engine mode)
RUNS = {
    "single": ("single", "shared"),
    "distill": ("distill", "shared"),
    "chain": ("chain", "text"),
    "fthss-untuned": ("chain", "shared"),
    "fthss": ("fthss", "shared"),
    "adapt": ("adapt", "shared"),
}
GOLD_UPSTREAM = ("chain", "fthss", "fthss-untuned", "adapt")
# paired differences a − b, each answering one question of the comparison
COMPARISONS = (
    ("fthss", "chain"),  # does sharing one cache cost accuracy against passing text?
    ("chain", "single"),  # does the task need the chain at all?
    ("fthss", "fthss-untuned"),  # does FTHSS tuning matter, or would text-trained stages do?
)


@dataclass
class MethodResult:
    method: str
    gold_upstream: bool
    scores: dict[str, list[float]]  # metric -> per-record score (0..1)
    stages: dict[str, dict[str, float]]  # stage -> mean latency, prefill, decode, KV bytes
    predictions: list[str]
    steps: list[list[dict]]  # per request: each step's stage and output text
    failed: int = 0  # requests the engine could not run (over a limit): scored as wrong

    def summary(self) -> dict:
        return {"method": self.method, "gold_upstream": self.gold_upstream, "failed": self.failed,
                **{m: 100 * float(np.mean(v)) for m, v in self.scores.items()},
                "stages": self.stages}


def run_method(base: BaseModel, task: Task, records: list[TaskRecord], method: str,
               stages: list[Stage], retriever=None, gold_upstream: bool = False,
               batch_size: int = 16, progress: bool = False,
               max_new_tokens: int | None = None) -> MethodResult:
    trained_as, mode = RUNS[method]
    requests = [method_view(trained_as, task.request(r, gold_upstream)) for r in records]
    for step in (s for r in requests for s in r.steps if max_new_tokens):
        step.max_new_tokens = min(step.max_new_tokens or max_new_tokens, max_new_tokens)
    step_input = (task.single_step_input(retriever) if trained_as == "single"
                  else task.step_input(retriever))
    engine = ChainEngine(base, stages, batch_size=batch_size)
    results = engine.run(requests, mode, step_input=step_input, progress=progress)
    predictions = [task.prediction(r) for r in results]
    scores = defaultdict(list)
    for prediction, record in zip(predictions, records, strict=True):
        for name, value in task.score(prediction, record).items():
            scores[name].append(value)
    per_stage = defaultdict(lambda: defaultdict(list))
    for result in results:
        for step in result.steps:
            if step.stats.decoded_tokens == 0:  # a given output: nothing was run
                continue
            row = per_stage[step.stage]
            row["latency_s"].append(step.stats.wall_s)
            row["ttft_s"].append(step.stats.time_to_first_token_s)
            row["prefilled_tokens"].append(step.stats.prefilled_tokens)
            row["decoded_tokens"].append(step.stats.decoded_tokens)
            row["kv_bytes"].append(step.stats.kv_bytes)
    stage_means = {stage: {k: float(np.mean(v)) for k, v in row.items()}
                   for stage, row in per_stage.items()}
    steps = [[{"stage": s.stage, "output": s.output} for s in r.steps] for r in results]
    return MethodResult(method, gold_upstream, dict(scores), stage_means, predictions, steps,
                        sum(r.error is not None for r in results))


def evaluate(base: BaseModel, task: Task, records: list[TaskRecord],
             stage_sets: dict[str, list[Stage]], retriever=None, gold_upstream: bool = True,
             batch_size: int = 16, progress: bool = False,
             max_new_tokens: int | None = None, kind: str | None = None) -> dict:
    """Run every method whose stages are given (`stage_sets` keyed by training method) and
    return the task's report section: per method its metrics and per-stage statistics, the
    gold-upstream runs, the COMPARISONS with paired-bootstrap 95% intervals, and `predictions`:
    one row per method and request (its step outputs, prediction, gold answer and scores).
    `kind` (the stages' kind) is stamped on every method, comparison and prediction row, so that
    sections of several kinds merge into one report (`merge_sections`)."""
    if not records:  # every metric would be a mean of nothing
        raise EmptyDataError(f"{task.name}: nothing to evaluate (no records)")
    runs = []
    for method, (trained_as, _) in RUNS.items():
        if trained_as not in stage_sets:
            continue
        options = [False, True] if gold_upstream and method in GOLD_UPSTREAM else [False]
        for gold in options:
            runs.append(run_method(base, task, records, method, stage_sets[trained_as],
                                   retriever, gold, batch_size, progress, max_new_tokens))
    tag = {"kind": kind} if kind else {}
    return {"task": task.name, "metric": task.metric, "records": len(records),
            "methods": [{**tag, **r.summary()} for r in runs],
            "comparisons": [{**tag, **row} for row in compare(runs, task.metric_names[0])],
            "predictions": [
                {**tag, "method": r.method, "gold_upstream": r.gold_upstream, "id": record.id,
                 "steps": steps, "prediction": prediction, "answer": record.answer,
                 "scores": {m: v[i] for m, v in r.scores.items()}}
                for r in runs for i, (record, steps, prediction)
                in enumerate(zip(records, r.steps, r.predictions, strict=True))]}


def merge_sections(sections: list[dict]) -> dict:
    """One task's report section from the sections `evaluate` wrote for each stage kind on the
    same records: their methods, comparisons and predictions side by side."""
    first = sections[0]
    if any((s["task"], s["records"]) != (first["task"], first["records"]) for s in sections):
        raise ValueError("merge_sections: the sections must be of one task and its records")
    return {**{k: first[k] for k in ("task", "metric", "records")},
            **{k: [row for s in sections for row in s[k]]
               for k in ("methods", "comparisons", "predictions")}}


def compare(runs: list[MethodResult], metric: str) -> list[dict]:
    """The COMPARISONS whose two runs are both present (per upstream), in points: a − b on
    `metric` with its paired-bootstrap 95% interval over the same requests."""
    by_key = {(r.method, r.gold_upstream): r for r in runs}
    rows = []
    for a, b in COMPARISONS:
        for gold in (False, True):
            pair = by_key.get((a, gold)), by_key.get((b, gold))
            if all(pair):
                diff, low, high = paired_bootstrap(pair[0].scores[metric], pair[1].scores[metric])
                rows.append({"a": a, "b": b, "gold_upstream": gold, "metric": metric,
                             "diff": 100 * diff, "ci95": [100 * low, 100 * high]})
    return rows
