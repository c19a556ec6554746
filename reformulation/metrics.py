"""Scores for subquery predictions.

All inputs are raw model strings ("a|b"); they are split with ``parse_subqueries``.
"""

import numpy as np

from .data import normalize_text, parse_subqueries

_scorer = None


def _rouge_scorer():
    global _scorer
    if _scorer is None:
        from rouge_score import rouge_scorer

        # No stemmer: "Birth Date" vs "Birth Dates" is a different search query. The
        # `evaluate` library's rouge defaults to the same, so numbers are comparable with it.
        _scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return _scorer


def _check_pair(predictions, references) -> tuple[list[str], list[str]]:
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("nothing to score: predictions and references are empty")
    for name, values in (("predictions", predictions), ("references", references)):
        for i, value in enumerate(values):
            if not isinstance(value, str):
                raise ValueError(f"{name}[{i}] must be a string, got {type(value).__name__}")
    return predictions, references


def rouge_l(predictions, references) -> float:
    """Mean ROUGE-L F1 of each prediction against its reference (rouge_score, no stemming).

    rouge_score lower-cases and keeps only [a-z0-9] tokens, so "|" acts as a word break.
    """
    predictions, references = _check_pair(predictions, references)
    scorer = _rouge_scorer()
    return float(np.mean([scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]))


def _key(subquery: str) -> str:
    # Compare what a search engine would treat as the same query: accents folded (the
    # vocabulary cannot spell them anyway), case and whitespace ignored.
    return normalize_text(subquery).casefold()


def score(predictions, references) -> dict:
    """Mean per-example scores, each a fraction in [0, 1].

    - ``rouge_l``: ROUGE-L F1 on the raw strings.
    - ``exact_match``: the predicted subquery SET equals the reference set (order-insensitive,
      case / whitespace / accent-insensitive, repeats ignored).
    - ``subquery_precision`` / ``subquery_recall`` / ``subquery_f1``: macro averages: computed
      per example on those sets, then averaged. An empty prediction scores 0 precision.
    - ``count``: number of examples.
    """
    predictions, references = _check_pair(predictions, references)
    em, precision, recall, f1 = [], [], [], []
    for p, r in zip(predictions, references):
        pred = {_key(s) for s in parse_subqueries(p)}
        ref = {_key(s) for s in parse_subqueries(r)}
        hit = len(pred & ref)
        prec = hit / len(pred) if pred else float(not ref)
        rec = hit / len(ref) if ref else float(not pred)
        em.append(float(pred == ref))
        precision.append(prec)
        recall.append(rec)
        f1.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
    return {
        "rouge_l": rouge_l(predictions, references),
        "exact_match": float(np.mean(em)),
        "subquery_precision": float(np.mean(precision)),
        "subquery_recall": float(np.mean(recall)),
        "subquery_f1": float(np.mean(f1)),
        "count": len(predictions),
    }
