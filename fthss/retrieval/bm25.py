"""Retrieval between stages: a small `Retriever` interface and BM25 over a corpus file.

BM25 comes from `bm25s` (sparse-matrix BM25, no downloads). Any object with the same `search`
method (a dense retriever, a web search tool) can be plugged into the tasks instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from fthss.datafiles import OnBad, jsonl_records, parse_each
from fthss.errors import EmptyDataError, FthssError


@dataclass
class Passage:
    id: str
    text: str
    score: float = 0.0


class Retriever(Protocol):
    def search(self, queries: list[str], k: int) -> list[list[Passage]]: ...


class CorpusFormatError(FthssError):
    """A corpus file that cannot be read; the message names the file and line."""


def _passage(row, where: str) -> tuple[str, str]:
    if (not isinstance(row, dict) or not isinstance(row.get("text"), str)
            or not isinstance(row.get("id"), (str, int)) or isinstance(row.get("id"), bool)):
        raise CorpusFormatError(f"{where}: need an object with 'id' (a string or an integer) "
                                "and a string 'text'")
    title = row.get("title")
    if title is not None and not isinstance(title, str):
        raise CorpusFormatError(f"{where}: field 'title' must be a string")
    return str(row["id"]), f"{title}: {row['text']}" if title else row["text"]


class BM25Retriever:
    def __init__(self, passages: list[tuple[str, str]]):
        """`passages`: (id, text) pairs. Tokens: lower-cased words of 2+ characters, English
        stopwords removed (bm25s's defaults), no stemming: names must match as written."""
        import bm25s

        if not passages:
            raise EmptyDataError("BM25 needs a non-empty corpus")
        self.ids = [pid for pid, _ in passages]
        self.texts = [text for _, text in passages]
        self._bm25s = bm25s
        tokens = self._tokenize(self.texts)
        if not any(tokens):  # bm25s cannot index a corpus without one word
            raise EmptyDataError("no passage holds a word to index (2+ letters, not a stopword)")
        self.index = bm25s.BM25()
        self.index.index(tokens, show_progress=False)

    def _tokenize(self, texts: list[str]):
        return self._bm25s.tokenize(texts, stopwords="en", show_progress=False, return_ids=False)

    @classmethod
    def from_file(cls, path: str | Path, on_bad: OnBad | None = None) -> BM25Retriever:
        """A JSONL corpus: `{"id": ..., "text": ...}` per line, an optional `"title"` first. A
        bad line raises CorpusFormatError, or goes to `on_bad` and is skipped."""
        passages = parse_each(jsonl_records(path, CorpusFormatError, on_bad), _passage,
                              CorpusFormatError, on_bad)
        try:
            return cls(passages)
        except ValueError as err:  # nothing to index: the file as a whole is unusable
            raise CorpusFormatError(f"{path}: {err}") from err

    def search(self, queries: list[str], k: int) -> list[list[Passage]]:
        """Top-k passages per query, best first; equal scores keep corpus order, and passages
        that share no word with the query are never returned."""
        results = []
        for tokens in self._tokenize(queries):
            scores = self.index.get_scores(tokens) if tokens else np.zeros(len(self.ids))
            order = np.argsort(-scores, kind="stable")[:k]
            results.append([Passage(self.ids[i], self.texts[i], float(scores[i]))
                            for i in order if scores[i] > 0])
        return results
