"""Memory ⇄ reasoning (multi-round, multiple choice). Shared: the question with its options.
Stage A reasons, stage B recalls knowledge, alternating, until A writes `[The answer is]: X`
(the authors' CommonsenseQA format). Reads the authors' training format (`I_ALL`, `O_1A`,
`O_1B`, ...) and their test format (`question`, `answer`: the gold letter).

The chosen option is the one the answer names ("the answer is Malaland, option B"), when it
names exactly one of the question's options; otherwise the letter after the marker. A small
base reasons its way to the right option but copies the wrong letter next to it about as often
as chance: the letter alone would score the lookup, not the chain."""

from __future__ import annotations

import re
from pathlib import Path

from fthss.datafiles import OnBad, check_record, json_document, parse_each
from fthss.engine.engine import END
from fthss.evaluation.metrics import accuracy, choice_letter, normalize_answer
from fthss.layout.chain import ChainFormatError, ChainSample, Step
from fthss.tasks.base import Task, TaskRecord

ANSWER_MARKER = "[The answer is]"
_OPTION = re.compile(r"\b([A-E])\.\s*(.+?)(?=\s+[A-E]\.|$)")
_NAMED = re.compile(r"answer is\s+([^,.\n\[]+)", re.IGNORECASE)


def chosen_option(prediction: str, question: str) -> str | None:
    """The option letter the prediction chose (see the module docstring)."""
    options = {normalize_answer(text): letter
               for letter, text in _OPTION.findall(question.split("Options:")[-1])}
    named = {options[n] for n in (normalize_answer(m) for m in _NAMED.findall(prediction))
             if n in options}
    return named.pop() if len(named) == 1 else choice_letter(prediction)


class MemoryReasoning(Task):
    name, metric, stages = "memory_reasoning", "choice", ("A", "B")
    rounds = "multi"

    def __init__(self, max_rounds: int = 4, step_tokens: int = 96):
        self.max_rounds, self.step_tokens = max_rounds, step_tokens

    def records(self, path, on_bad: OnBad | None = None) -> list[TaskRecord]:
        """Gold chains, or the authors' test format (a JSON list of `question`/`answer`)."""
        path = Path(path)
        raw = json_document(path, ChainFormatError) if path.suffix == ".json" else None
        # the format is the first record's that is an object: a bad record before it (null,
        # a number) is the same bad record in either format, for `on_bad` to skip
        objects = (r for r in (raw if isinstance(raw, list) else []) if isinstance(r, dict))
        first = next(objects, None)
        if first is not None and "question" in first:
            return parse_each(((f"{path}: record {i}", (i, r)) for i, r in enumerate(raw)),
                              self._test_record, ChainFormatError, on_bad)
        return super().records(path, on_bad)

    def record(self, index: int, sample: ChainSample) -> TaskRecord:
        letter = choice_letter(sample.steps[-1].output or "")
        if letter is None:
            raise ChainFormatError(f"{sample.source}: the last output has no "
                                   f"'{ANSWER_MARKER}: X'")
        return TaskRecord(sample.id or str(index), sample, letter)

    @staticmethod
    def _test_record(item: tuple[int, dict], where: str) -> TaskRecord:
        i, record = item
        if (not isinstance(record, dict) or not isinstance(record.get("question"), str)
                or not isinstance(record.get("answer"), str)):
            raise ChainFormatError(f"{where}: test records need string fields 'question' and "
                                   "'answer'")
        check_record(record, where, ChainFormatError)
        letter = record["answer"].strip().upper()
        if letter not in tuple("ABCDE"):
            raise ChainFormatError(f"{where}: field 'answer' must be an option letter A-E, not "
                                   f"{record['answer']!r}")
        sample = ChainSample(record["question"], [], str(record.get("id", i)), source=where)
        return TaskRecord(sample.id, sample, letter)

    def request(self, record: TaskRecord, gold_upstream: bool = False) -> ChainSample:
        steps = [Step(stage, max_new_tokens=self.step_tokens)
                 for _ in range(self.max_rounds) for stage in "AB"][:-1]  # ends with A
        if gold_upstream and record.sample.steps:
            gold = record.sample.steps[:-1]
            steps = [Step(s.stage, output=s.output) for s in gold] + [
                Step("A", max_new_tokens=self.step_tokens)]
        return ChainSample(record.sample.shared, steps, record.id)

    def step_input(self, retriever=None):
        def stop_once_answered(request, k, outputs):
            # steps alternate A, B: an odd step follows an A step (whatever the stages' names)
            return END if k % 2 == 1 and ANSWER_MARKER in outputs[-1] else None
        return stop_once_answered

    def prediction(self, result) -> str:
        return result.output  # the chain ends on an A step

    def score(self, prediction: str, record: TaskRecord) -> dict[str, float]:
        return {"acc": accuracy(chosen_option(prediction, record.sample.shared), record.answer)}
