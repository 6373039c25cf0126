"""The shared test bundle itself learnt something (the predictor and demo tests rely on it)."""
from __future__ import annotations

from ._bundle import ground_truth


def test_bundle_learnt_modality(predictor, predictor_phantom):
    """The shared bundle beats always-the-commonest-answer on held-out modality questions."""
    rows = [r for r in ground_truth(predictor_phantom) if r["kind"] == "modality" and r["answer_type"] == "OPEN"]
    preds = predictor.predict_batch([r["image"] for r in rows], [r["question"] for r in rows])
    accuracy = sum(p.answer == r["answer"] for p, r in zip(preds, rows)) / len(rows)
    majority = max(sum(r["answer"] == a for r in rows) for a in {r["answer"] for r in rows}) / len(rows)
    assert accuracy > majority, (accuracy, majority)
