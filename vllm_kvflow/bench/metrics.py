"""Answer-quality metrics (LongBench conventions) and paired bootstrap intervals."""
from __future__ import annotations

import re
import string
from collections import Counter

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ECHO = re.compile(r"passage\s*\d+\s*:", re.IGNORECASE)


def normalize(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    common = Counter(pred) & Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def contains_answer(prediction: str, answers: list[str]) -> float:
    """RULER-style accuracy: a normalized gold answer occurs in the normalized output."""
    pred = normalize(prediction)
    return float(any(normalize(a) and normalize(a) in pred for a in answers))


def best_f1(prediction: str, answers: list[str]) -> float:
    return max(token_f1(prediction, a) for a in answers)


def is_echo(prediction: str) -> float:
    """The answer reproduces passage headers ("Passage 3:") instead of answering."""
    return float(bool(_ECHO.search(prediction)))


def mean_ci(values, resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean and its 95% bootstrap interval."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, (resamples, v.size))].mean(axis=1)
    return float(v.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def paired_diff_ci(a, b, resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a - b over the same items, with a 95% paired bootstrap interval."""
    return mean_ci(np.asarray(a, dtype=float) - np.asarray(b, dtype=float), resamples, seed)
