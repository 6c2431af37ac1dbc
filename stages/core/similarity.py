"""Text similarity of generated answers: ROUGE-1/2/L (F) and BLEU-4, in percent.

Chinese has no spaces, so words come from jieba (which also splits English on spaces and
punctuation); BLEU-4 is computed on characters, as LLaMA-Factory does, which is fair to
both scripts.
"""

from __future__ import annotations

import logging


def similarity_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-scores and smoothed sentence BLEU-4 over pairs, each in [0, 100]."""
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    jieba.setLogLevel(logging.WARNING)
    totals = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0, "bleu-4": 0.0}
    rouge, smooth = Rouge(), SmoothingFunction().method3
    for prediction, reference in zip(predictions, references):
        hypothesis = [w for w in jieba.cut(prediction) if w.strip()]
        gold = [w for w in jieba.cut(reference) if w.strip()]
        if hypothesis and gold:
            scores = rouge.get_scores(" ".join(hypothesis), " ".join(gold))[0]
            for key in ("rouge-1", "rouge-2", "rouge-l"):
                totals[key] += scores[key]["f"]
        if prediction.strip() and reference.strip():
            totals["bleu-4"] += sentence_bleu([list(reference)], list(prediction), smoothing_function=smooth)
    count = max(len(predictions), 1)
    return {key: round(100 * value / count, 4) for key, value in totals.items()}
