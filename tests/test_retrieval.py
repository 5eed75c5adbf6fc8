"""BM25 retrieval over a corpus file."""

import json

import pytest

from fthss.retrieval.bm25 import BM25Retriever, CorpusFormatError

CORPUS = [("ada", "Ada Nedo was born in Oslo."), ("bob", "Bob Kim works for Acme Corp."),
          ("oslo", "Oslo is a city in Norland."), ("ada2", "Ada Rimo lives in Lima.")]


def test_the_right_passage_ranks_first():
    retriever = BM25Retriever(CORPUS)
    [hits] = retriever.search(["where was Ada Nedo born"], k=2)
    assert [h.id for h in hits] == ["ada", "ada2"] and hits[0].score > hits[1].score
    acme, nothing = retriever.search(["Acme", "zebra"], k=3)
    assert [h.id for h in acme] == ["bob"] and nothing == []


def test_ties_keep_corpus_order():
    retriever = BM25Retriever([("a", "red apple"), ("b", "red apple"), ("c", "green pear")])
    assert [h.id for h in retriever.search(["apple"], k=5)[0]] == ["a", "b"]


def test_corpus_file(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"id": i, "title": i.upper(), "text": t}) + "\n"
                            for i, t in CORPUS))
    [hits] = BM25Retriever.from_file(path).search(["Norland"], k=1)
    assert (hits[0].id, hits[0].text) == ("oslo", "OSLO: Oslo is a city in Norland.")
    path.write_text('{"id": "a", "text": "x"}\n{"id": "b"}\n')
    with pytest.raises(CorpusFormatError, match=r"corpus.jsonl:2: need an object"):
        BM25Retriever.from_file(path)
    path.write_text('{"id": "a", "text": "x"}\n\n{oops\n')
    with pytest.raises(CorpusFormatError, match=r"corpus.jsonl:3: malformed JSON"):
        BM25Retriever.from_file(path)
