"""Answer metrics: SQuAD's exact match and token F1, multiple-choice accuracy, and the paired
bootstrap that says whether two systems differ on the same questions."""

from __future__ import annotations

import re
import string
from collections import Counter

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _best(metric, prediction: str, gold: str | list[str]) -> float:
    golds = [gold] if isinstance(gold, str) else gold
    return max(metric(prediction, g) for g in golds)


def _exact(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def _f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, gold: str | list[str]) -> float:
    return _best(_exact, prediction, gold)


def f1(prediction: str, gold: str | list[str]) -> float:
    return _best(_f1, prediction, gold)


_MARKER = re.compile(r"\[The answer is\]\s*:?\s*\(?([A-Ea-e])\b")
_FALLBACK = re.compile(r"answer(?: is)?\s*:?\s*\(?([A-E])\b", re.IGNORECASE)


def choice_letter(text: str) -> str | None:
    """The option a multiple-choice output chose: the authors' `[The answer is]: X` marker
    first (the last one, if several), then 'answer is X' / 'Answer: (X)'."""
    for pattern in (_MARKER, _FALLBACK):
        found = pattern.findall(text)
        if found:
            return found[-1].upper()
    return None


def accuracy(prediction: str | None, gold: str) -> float:
    return float(prediction is not None and prediction.upper() == gold.strip().upper())


def paired_bootstrap(scores_a, scores_b, samples: int = 1000, seed: int = 0
                     ) -> tuple[float, float, float]:
    """Mean of a − b over the same questions and its 95% percentile interval, resampling the
    questions with replacement."""
    a, b = np.asarray(scores_a, dtype=float), np.asarray(scores_b, dtype=float)
    if a.shape != b.shape or a.size == 0:
        raise ValueError("paired bootstrap needs two non-empty score lists of the same length")
    diff = a - b
    picks = np.random.default_rng(seed).integers(0, diff.size, size=(samples, diff.size))
    means = diff[picks].mean(axis=1)
    return float(diff.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))
