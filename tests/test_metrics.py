"""The VQA metrics against their reference implementations."""
from __future__ import annotations

import random

import pytest

from vqa.metrics import bleu
from vqa.text import tokenize

WORDS = ["left", "right", "lung", "upper", "lobe", "the", "of", "mass", "ct", "mri", "axial", "yes", "no", "a"]


def _phrase(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 7)))


def test_bleu_is_nltk_sentence_bleu_with_method1_smoothing_to_the_last_bit():
    translate = pytest.importorskip("nltk.translate.bleu_score")
    smooth = translate.SmoothingFunction().method1
    rng = random.Random(0)
    pairs = [(_phrase(rng), _phrase(rng)) for _ in range(3000)]
    pairs += [("left upper lobe", "left upper lobe"), ("right lung", "the right lung"), ("", ""), ("mass", "")]
    nonzero = 0
    for prediction, reference in pairs:
        p, r = tokenize(prediction), tokenize(reference)
        if p and r:
            n = max(1, min(4, len(r), len(p)))
            expected = float(translate.sentence_bleu([r], p, weights=[1 / n] * n, smoothing_function=smooth))
        else:
            expected = float(p == r)
        assert bleu(prediction, reference) == expected, (prediction, reference)
        nonzero += 0 < expected < 1
    assert nonzero > 500  # the random pairs exercise partial matches and smoothing, not only 0 and 1


def test_routed_accuracies_count_open_and_closed_over_the_routers_split_as_qcr_does():
    from pathlib import Path

    from vqa.data.record import CLOSED, OPEN, make_record
    from vqa.metrics import vqa_metrics

    def record(i, answer, kind):
        return make_record(image=Path(f"{i}.png"), question=f"q{i}", answer=answer, answer_type=kind,
                           question_type="x", split="test", source_id=i, dataset="t")

    records = [record(0, "yes", CLOSED), record(1, "no", CLOSED), record(2, "yes", CLOSED), record(3, "lung", OPEN)]
    predictions = ["yes", "no", "liver", "lung"]
    routes = [CLOSED, CLOSED, OPEN, OPEN]  # question 2 is closed, routed to the open branch and answered wrong
    m = vqa_metrics(records, predictions, routes)
    assert (m["closed"], m["open"], m["overall"]) == (2 / 3, 1.0, 0.75)  # the dataset's types
    assert m["routed"] == {"n_closed": 2, "n_open": 2, "closed": 1.0, "open": 0.5}
    assert "routed" not in vqa_metrics(records, predictions)
