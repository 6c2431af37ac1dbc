"""SQuAD-style exact match and F1 over gold aliases, as the PRAG/DyPRAG evaluation computes them.

Pipeline for one generated answer (PRAG `utils.evaluate`):
1. `extract_answer`: direct prompts keep the text up to the first ".", "\\n" or "," (each cut
   in turn); chain-of-thought answers first keep what follows the first "the answer is".
2. `normalize_answer`: lower-case, drop punctuation, drop the articles a/an/the, collapse
   whitespace.
3. EM: 1 if the normalised prediction equals any normalised gold alias.
   F1: token-overlap F1 against each alias, best alias wins (precision and recall are each
   maximised over aliases too, as in the original).

Yes/no questions (the original's rule, in its F1): when either side normalises to "yes",
"no" or "noanswer", the pair only scores when both are identical, so "no" never earns
partial credit against "yes" and "yes it is" gets 0 against the gold "yes". Because the
answer is cut at the first "," or ".", a reply "Yes, he was." is scored as "yes".
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)
_CLOSED_ANSWERS = ("yes", "no", "noanswer")
_STOPS = (".", "\n", ",")
SCORE_KEYS = ("em", "f1", "precision", "recall")


def normalize_answer(text: str) -> str:
    """Lower-case, strip punctuation, then articles, then collapse whitespace (SQuAD order)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def extract_answer(text: str, with_cot: bool = False) -> str:
    """The answer span of a generation: after "the answer is" (CoT), up to the first . \\n or ,"""
    if with_cot and "the answer is" in text:
        text = text[text.find("the answer is") + len("the answer is"):]
    text = text.strip()
    for stop in _STOPS:  # in turn, as the original: "a\nb, c." -> "a"
        end = text.find(stop)
        if end != -1:
            text = text[:end].strip()
    return text


def _golds(gold: str | Sequence[str]) -> list[str]:
    golds = [gold] if isinstance(gold, str) else list(gold)
    if not golds:
        raise ValueError("a question needs at least one gold answer")
    return golds


def exact_match(prediction: str, gold: str | Sequence[str]) -> float:
    """1.0 when the normalised prediction equals a normalised gold alias, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in _golds(gold)))


def f1_score(prediction: str, gold: str | Sequence[str]) -> tuple[float, float, float]:
    """(F1, precision, recall) of token overlap, each the best over the gold aliases."""
    pred = normalize_answer(prediction)
    best = [0.0, 0.0, 0.0]
    for alias in _golds(gold):
        truth = normalize_answer(alias)
        if (pred in _CLOSED_ANSWERS or truth in _CLOSED_ANSWERS) and pred != truth:
            continue
        pred_tokens, truth_tokens = pred.split(), truth.split()
        same = sum((Counter(pred_tokens) & Counter(truth_tokens)).values())
        if same == 0:
            continue
        precision, recall = same / len(pred_tokens), same / len(truth_tokens)
        f1 = 2 * precision * recall / (precision + recall)
        best = [max(b, v) for b, v in zip(best, (f1, precision, recall))]
    return best[0], best[1], best[2]


@dataclass(frozen=True)
class Score:
    """One scored answer: the extracted span and its metrics."""

    prediction: str
    em: float
    f1: float
    precision: float
    recall: float


def evaluate(generation: str, gold: str | Sequence[str], with_cot: bool = False) -> Score:
    """Extract the answer from a generation and score it against the gold aliases."""
    prediction = extract_answer(generation, with_cot)
    f1, precision, recall = f1_score(prediction, gold)
    return Score(prediction, exact_match(prediction, gold), f1, precision, recall)

