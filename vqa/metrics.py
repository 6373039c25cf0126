"""VQA metrics: exact-match accuracy overall / closed / open / per question type, and open-answer
BLEU, token F1 and token recall. Closed/open always comes from the dataset's own answer_type."""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Sequence

from .data.record import CLOSED, OPEN, Record
from .text import tokenize


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall (SQuAD-style bag of tokens)."""
    p, r = tokenize(prediction), tokenize(reference)
    common = sum((Counter(p) & Counter(r)).values())
    if not p or not r or common == 0:
        return float(p == r)
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def token_recall(prediction: str, reference: str) -> float:
    """The share of the reference answer's tokens that the prediction contains (bag of tokens): the open-question
    "recall" LLaVA-Med reports for PathVQA, VQA-RAD and SLAKE (a long answer holding the right words scores 1)."""
    p, r = tokenize(prediction), tokenize(reference)
    if not r:
        return float(not p)
    return sum((Counter(p) & Counter(r)).values()) / len(r)


def bleu(prediction: str, reference: str, max_n: int = 4) -> float:
    """Sentence BLEU (uniform weights up to the answer's length, smoothed): most answers are short.

    NLTK's `sentence_bleu` with `SmoothingFunction().method1` (a zero n-gram count becomes 0.1), to the last
    bit (tests/test_metrics.py checks it), written out because NLTK's took ~1 ms a pair: BLEU is scored at every
    validation epoch."""
    p, r = tokenize(prediction), tokenize(reference)
    if not p or not r:
        return float(p == r)
    n = max(1, min(max_n, len(r), len(p)))
    logs = []
    for k in range(1, n + 1):
        hyp, ref = Counter(zip(*(p[i:] for i in range(k)))), Counter(zip(*(r[i:] for i in range(k))))
        matched = sum((hyp & ref).values())
        if matched == 0 and k == 1:
            return 0.0  # no word in common: NLTK returns 0 before smoothing
        logs.append(math.log((matched or 0.1) / sum(hyp.values())))
    brevity = 1.0 if len(p) > len(r) else math.exp(1 - len(r) / len(p))
    return brevity * math.exp(math.fsum(1 / n * x for x in logs))


def _accuracy(hits: Sequence[bool]) -> float | None:
    return sum(hits) / len(hits) if hits else None


def vqa_metrics(records: Sequence[Record], predictions: Sequence[str],
                predicted_types: Sequence[str] | None = None) -> dict:
    """Accuracy (overall, closed, open, per question type) and open BLEU/F1 for `predictions`.

    `predicted_types` (QCR's router) is reported as its own accuracy, and as QCR's code scores (`routed`: open and
    closed over the questions the router sends to each branch); it never decides the main buckets.
    """
    if len(records) != len(predictions):
        raise ValueError(f"{len(records)} records but {len(predictions)} predictions")
    hits = [p == r.answer for r, p in zip(records, predictions)]
    by_type: dict[str, list[bool]] = defaultdict(list)
    for r, h in zip(records, hits):
        by_type[r.question_type].append(h)
    open_pairs = [(p, r.answer) for r, p in zip(records, predictions) if r.answer_type == OPEN]
    out = {
        "n": len(records),
        "n_closed": sum(r.answer_type == CLOSED for r in records),
        "n_open": len(open_pairs),
        "overall": _accuracy(hits),
        "closed": _accuracy([h for r, h in zip(records, hits) if r.answer_type == CLOSED]),
        "open": _accuracy([h for r, h in zip(records, hits) if r.answer_type == OPEN]),
        "per_question_type": {t: {"n": len(h), "accuracy": _accuracy(h)} for t, h in sorted(by_type.items())},
    }
    if open_pairs:
        out["open_bleu"] = sum(bleu(p, g) for p, g in open_pairs) / len(open_pairs)
        out["open_f1"] = sum(token_f1(p, g) for p, g in open_pairs) / len(open_pairs)
        out["open_token_recall"] = sum(token_recall(p, g) for p, g in open_pairs) / len(open_pairs)
    if predicted_types is not None:
        out["type_accuracy"] = _accuracy([t == r.answer_type for r, t in zip(records, predicted_types)])
        # QCR's code counts its open and closed accuracies over the questions its router sends to each branch,
        # not over the dataset's types: its published pair compares with this one (overall is the same).
        routed = {kind: [h for t, h in zip(predicted_types, hits) if t == kind] for kind in (CLOSED, OPEN)}
        out["routed"] = {"n_closed": len(routed[CLOSED]), "n_open": len(routed[OPEN]),
                         "closed": _accuracy(routed[CLOSED]), "open": _accuracy(routed[OPEN])}
    return out


def choice_metrics(records: Sequence[Record], predictions: Sequence[str]) -> dict:
    """Multiple-choice accuracy (PMC-VQA): the predicted choice text against the answer."""
    hits = [p == r.answer for r, p in zip(records, predictions)]
    chance = sum(1 / max(len(r.choices), 1) for r in records) / max(len(records), 1)
    return {"n": len(records), "overall": _accuracy(hits), "chance": chance}


def closed_confusion(records: Sequence[Record], predictions: Sequence[str]) -> tuple[list[str], list[list[int]]]:
    """Confusion counts over closed questions: labels (answers seen) and rows = truth, cols = prediction."""
    pairs = [(r.answer, p) for r, p in zip(records, predictions) if r.answer_type == CLOSED]
    labels = sorted({a for a, _ in pairs} | {"yes", "no"})
    other = "other"
    cols = labels + ([other] if any(p not in labels for _, p in pairs) else [])
    matrix = [[0] * len(cols) for _ in labels]
    for truth, pred in pairs:
        matrix[labels.index(truth)][cols.index(pred if pred in labels else other)] += 1
    return cols, matrix
