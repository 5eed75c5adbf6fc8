"""What a task is: how a data record becomes a chain (gold, for training; a request, for
inference), what runs between steps, how the final answer is read, and how it is scored."""

from __future__ import annotations

from dataclasses import dataclass

from fthss.datafiles import OnBad, parse_each
from fthss.engine.engine import ChainResult, StepInput
from fthss.evaluation.metrics import accuracy, choice_letter, exact_match, f1
from fthss.layout.chain import ChainFormatError, ChainSample, load_chains


@dataclass
class TaskRecord:
    id: str
    sample: ChainSample  # the gold chain (outputs None where the data has none)
    answer: str  # gold final answer (an option letter for multiple choice)


class Task:
    name: str
    metric: str  # "qa": EM and F1; "choice": accuracy
    stages: tuple[str, ...]
    rounds = "single"  # "multi": stages take turns (FTHSS trains them jointly)

    def records(self, path, on_bad: OnBad | None = None) -> list[TaskRecord]:
        """The task's records in a chain file. A record that is not this task's chain raises
        ChainFormatError naming it, or goes to `on_bad` and is skipped."""
        samples = ((s.source, (i, s)) for i, s in enumerate(load_chains(path, on_bad)))
        return parse_each(samples, lambda item, _: self.record(*item), ChainFormatError, on_bad)

    def record(self, index: int, sample: ChainSample) -> TaskRecord:
        """The record of a gold chain (`index`: its place among the chains read, its id when it
        has none), or ChainFormatError naming `sample.source`."""
        raise NotImplementedError

    def request(self, record: TaskRecord, gold_upstream: bool = False) -> ChainSample:
        """The chain the engine runs. With `gold_upstream`, every step but the last keeps its
        gold output (given, not generated): the gold-intermediate ablation."""
        raise NotImplementedError

    def step_input(self, retriever=None) -> StepInput | None:
        return None

    def single_step_input(self, retriever=None) -> StepInput | None:
        """What the one-prompt `single` baseline is given between steps (it has one step)."""
        return None

    def prediction(self, result: ChainResult) -> str:
        return result.output.strip()

    def score(self, prediction: str, record: TaskRecord) -> dict[str, float]:
        if self.metric == "choice":
            return {"acc": accuracy(choice_letter(prediction), record.answer)}
        return {"em": exact_match(prediction, record.answer), "f1": f1(prediction, record.answer)}

    @property
    def metric_names(self) -> tuple[str, ...]:
        return ("acc",) if self.metric == "choice" else ("em", "f1")
