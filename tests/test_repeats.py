"""Test questions that repeat a training question about the same image (VQA-RAD splits by question): found, counted
by `medvqa data stats`, scored apart by `medvqa eval`."""
from __future__ import annotations

import json

import pytest


def test_questions_repeating_training_are_found_and_scored_apart(trained_bundle, predictor_phantom, tmp_path):
    """VQA-RAD's test rephrases training questions about the same images: eval scores those apart."""
    import shutil

    from vqa.data import load_vqa_rad
    from vqa.evaluate import evaluate
    from vqa.stats import dataset_stats, repeats_training

    data = tmp_path / "vqa-rad"
    shutil.copytree(predictor_phantom / "vqa-rad", data, symlinks=True)
    train, test = (json.loads((data / f"{s}set.json").read_text()) for s in ("train", "test"))
    rephrased = [{**q, "qid": 10_000 + i, "question": q["question"].replace("Is there", "Do you see")}
                 for i, q in enumerate(train[:5])]
    other_image = {**train[5], "qid": 20_000, "image_name": next(q["image_name"] for q in test)}  # same words only
    (data / "testset.json").write_text(json.dumps(test + rephrased + [other_image]))
    records, train_records = load_vqa_rad(data, "test"), load_vqa_rad(data, "train")
    flags = repeats_training(records, train_records)
    assert flags == [False] * len(test) + [True] * 5 + [False]
    stats = dataset_stats({"train": train_records, "test": records})
    assert stats["test_repeating_train"]["share"] == pytest.approx(5 / len(records))
    report, _, _ = evaluate(trained_bundle, "vqa-rad", str(data), device="cpu", cache_dir=str(tmp_path / "c"),
                            progress=False)
    subsets = report["subsets"]
    assert (subsets["repeats_train"]["n"], subsets["new_question"]["n"]) == (5, len(records) - 5)
    trust = report["calibration"]["subsets"]  # confidence measured within each type, apart
    assert sum(trust[f"{t} {s}"]["after"]["n"] for t in ("CLOSED", "OPEN") for s in ("repeats_train", "new_question")
               if f"{t} {s}" in trust) == len(records)
    whole = subsets["all"]["overall"] * len(records)
    assert whole == pytest.approx(subsets["repeats_train"]["overall"] * 5 + subsets["new_question"]["overall"] *
                                  (len(records) - 5))
    # the bundle's own phantom is split by image: nothing repeats, no such subsets
    report, _, _ = evaluate(trained_bundle, "vqa-rad", str(predictor_phantom / "vqa-rad"), device="cpu",
                            cache_dir=str(tmp_path / "c"), progress=False)
    assert "repeats_train" not in report["subsets"] and "subsets" not in report["calibration"]
