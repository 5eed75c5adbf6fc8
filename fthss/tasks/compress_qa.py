"""Context compression → QA (single round). Shared: the question. Stage A reads the retrieved
passages (its private input: the QA stage never sees them) and writes a compression; stage B
answers from the question and the compression alone."""

from __future__ import annotations

from fthss.layout.chain import ChainFormatError, ChainSample, Step
from fthss.tasks.base import Task, TaskRecord


class CompressQA(Task):
    name, metric, stages = "compress_qa", "qa", ("A", "B")

    def __init__(self, compression_tokens: int = 128, answer_tokens: int = 24):
        self.compression_tokens, self.answer_tokens = compression_tokens, answer_tokens

    def record(self, index: int, sample: ChainSample) -> TaskRecord:
        if [s.stage for s in sample.steps] != ["A", "B"] or sample.steps[1].output is None:
            raise ChainFormatError(f"{sample.source}: compress_qa needs steps A (input: the "
                                   "passages) then B (output: the answer)")
        return TaskRecord(sample.id or str(index), sample, sample.steps[1].output)

    def request(self, record: TaskRecord, gold_upstream: bool = False) -> ChainSample:
        compress, _ = record.sample.steps
        return ChainSample(record.sample.shared, [
            Step("A", input=compress.input, max_new_tokens=self.compression_tokens,
                 output=compress.output if gold_upstream else None),
            Step("B", max_new_tokens=self.answer_tokens, stop=["\n"])], record.id)
