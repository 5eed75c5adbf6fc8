"""The two tasks with a retriever between stages.

rewrite_qa (single round): stage A rewrites the question into search queries (one per line);
  the retriever fetches passages for them, which become stage B's input; B answers.
active_rag (multi-round): stage A writes what to look up next; the retriever inserts passages
  as the input of stage B, which writes the next piece of the answer; repeat until B writes
  `answer: ...`, the final answer.

Records are our JSONL chains with gold outputs (the synthetic world writes them): the gold
passages in B's inputs are for training; at inference the retriever supplies them.
"""

from __future__ import annotations

from fthss.engine.engine import END
from fthss.layout.chain import ChainFormatError, ChainSample, Step
from fthss.tasks.base import Task, TaskRecord

FINAL = "answer:"


def passages_text(retriever, queries: list[str], k: int) -> str:
    """Top-k passages for each query, deduplicated, in rank order, one per line."""
    seen, lines = set(), []
    for hits in retriever.search(queries, k):
        for passage in hits:
            if passage.id not in seen:
                seen.add(passage.id)
                lines.append(passage.text)
    return "\n".join(lines)


def search_queries(text: str) -> list[str]:
    """A stage's output as search queries: one per non-empty line (the text itself if none)."""
    return [q.strip() for q in text.splitlines() if q.strip()] or [text.strip() or "?"]


class _RetrievalTask(Task):
    metric = "qa"

    # one passage per query by default: the world's training chains hold one gold passage
    # per query, so the stages are trained on what inference gives them when retrieval is right
    def __init__(self, passages_per_query: int = 1, query_tokens: int = 32,
                 answer_tokens: int = 24):
        self.k, self.query_tokens, self.answer_tokens = (passages_per_query, query_tokens,
                                                         answer_tokens)

    def record(self, index: int, sample: ChainSample) -> TaskRecord:
        stages = [s.stage for s in sample.steps]
        if len(stages) < 2 or set(stages) != {"A", "B"} or stages[-1] != "B":
            raise ChainFormatError(f"{sample.source}: {self.name} needs alternating A, B steps "
                                   "ending with B")
        return TaskRecord(sample.id or str(index), sample, self.gold(sample))

    def gold(self, sample: ChainSample) -> str:
        return sample.steps[-1].output or ""

    def request(self, record: TaskRecord, gold_upstream: bool = False) -> ChainSample:
        gold = record.sample.steps
        steps = [Step(s.stage, input=s.input if gold_upstream else None,
                      output=s.output if gold_upstream else None,
                      max_new_tokens=self.query_tokens if s.stage == "A" else self.answer_tokens,
                      stop=["\n"] if s.stage == "B" else [])
                 for s in gold[:-1]]
        steps.append(Step("B", input=gold[-1].input if gold_upstream else None,
                          max_new_tokens=self.answer_tokens, stop=["\n"]))
        return ChainSample(record.sample.shared, steps, record.id)


    def single_step_input(self, retriever):
        """The one-prompt baseline reads passages retrieved for the question (standard RAG):
        as many as the chain retrieves for its two hops, as its training chains hold two."""
        return lambda request, k, outputs: passages_text(retriever, [request.shared], 2 * self.k)


# Steps alternate A, B, so a B step has an odd index; the check does not use stage names,
# which the distill baseline replaces.
class RewriteQA(_RetrievalTask):
    name, stages = "rewrite_qa", ("A", "B")

    def step_input(self, retriever=None):
        def retrieve(request, k, outputs):
            if k % 2 == 0 or request.steps[k].input is not None:
                return None
            return passages_text(retriever, search_queries(outputs[-1]), self.k)
        return retrieve


class ActiveRAG(_RetrievalTask):
    name, stages = "active_rag", ("A", "B")
    rounds = "multi"

    def gold(self, sample: ChainSample) -> str:
        return _after_final(sample.steps[-1].output or "")

    def step_input(self, retriever=None):
        def retrieve(request, k, outputs):
            if k % 2 == 0 and k > 0 and FINAL in outputs[-1].lower():
                return END
            if k % 2 == 0 or request.steps[k].input is not None:
                return None
            return passages_text(retriever, search_queries(outputs[-1]), self.k)
        return retrieve

    def prediction(self, result) -> str:
        return _after_final(result.output)


def _after_final(text: str) -> str:
    lower = text.lower()
    return text[lower.rindex(FINAL) + len(FINAL):].strip() if FINAL in lower else text.strip()
