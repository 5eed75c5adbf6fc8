"""Retrieval between stages: a small `Retriever` interface and BM25 over a corpus file.

BM25 comes from `bm25s` (sparse-matrix BM25, no downloads). Any object with the same `search`
method (a dense retriever, a web search tool) can be plugged into the tasks instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np


@dataclass
class Passage:
    id: str
    text: str
    score: float = 0.0


class Retriever(Protocol):
    def search(self, queries: list[str], k: int) -> list[list[Passage]]: ...


class CorpusFormatError(ValueError):
    """A corpus file that cannot be read; the message names the file and line."""


class BM25Retriever:
    def __init__(self, passages: list[tuple[str, str]]):
        """`passages`: (id, text) pairs. Tokens: lower-cased words of 2+ characters, English
        stopwords removed (bm25s's defaults), no stemming: names must match as written."""
        import bm25s

        if not passages:
            raise ValueError("BM25 needs a non-empty corpus")
        self.ids = [pid for pid, _ in passages]
        self.texts = [text for _, text in passages]
        self._bm25s = bm25s
        self.index = bm25s.BM25()
        self.index.index(self._tokenize(self.texts), show_progress=False)

    def _tokenize(self, texts: list[str]):
        return self._bm25s.tokenize(texts, stopwords="en", show_progress=False, return_ids=False)

    @classmethod
    def from_file(cls, path: str | Path) -> BM25Retriever:
        """A JSONL corpus: `{"id": ..., "text": ...}` per line, an optional `"title"` first."""
        from fthss.layout.chain import jsonl_records

        path, passages = Path(path), []
        for where, row in jsonl_records(path, path.read_text(encoding="utf-8"), CorpusFormatError):
            if not isinstance(row, dict) or not isinstance(row.get("text"), str) or "id" not in row:
                raise CorpusFormatError(f"{where}: need an object with 'id' and a string 'text'")
            title = row.get("title")
            passages.append((str(row["id"]), f"{title}: {row['text']}" if title else row["text"]))
        return cls(passages)

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
