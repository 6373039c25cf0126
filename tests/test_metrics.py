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
