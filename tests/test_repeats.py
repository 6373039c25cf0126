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


def test_test_questions_whose_template_is_in_train_are_counted(tmp_path):
    """VQA-RAD's release phrases a question as asked, paraphrased and templated; MEVF's split puts the templates in
    train. A test question counts when its own release item's template is a training question about its image."""
    from vqa.stats import format_stats, templated_in_train

    release = [  # qid 1: asked + templated; qid 2: paraphrased test question, template in train with another answer
        {"qid": 1, "image_name": "a.jpg", "question": "Is the heart enlarged?", "question_rephrase": "NULL",
         "question_frame": "Is there cardiomegaly?", "answer": "Yes", "answer_type": "CLOSED"},
        {"qid": 2, "image_name": "b.jpg", "question": "What organ is shown?",
         "question_rephrase": "Which organ is this?", "question_frame": "What organ is this?", "answer": "Lung",
         "answer_type": "OPEN"},
        {"qid": 3, "image_name": "b.jpg", "question": "Is there a mass?", "question_rephrase": "NULL",
         "question_frame": "NULL", "answer": "No", "answer_type": "CLOSED"},
    ]
    train = [{"image_name": "a.jpg", "question": "Is there  cardiomegaly?", "answer": "yes"},
             {"image_name": "b.jpg", "question": "What organ is this?", "answer": "liver"},
             {"image_name": "a.jpg", "question": "Is there a mass?", "answer": "no"}]  # another image's question
    test = [{"image_name": "a.jpg", "question": "Is the heart enlarged?", "answer": "Yes", "answer_type": "CLOSED "},
            {"image_name": "b.jpg", "question": "Which organ is this?", "answer": "Lung", "answer_type": "OPEN"},
            {"image_name": "b.jpg", "question": "Is there a mass?", "answer": "No", "answer_type": "CLOSED"}]
    for name, items in (("VQA_RAD_Dataset_Public.json", release), ("trainset.json", train), ("testset.json", test)):
        (tmp_path / name).write_text(json.dumps(items))
    counts = templated_in_train(tmp_path)
    assert counts == {"CLOSED": {"questions": 2, "template_in_train": 1, "same_answer": 1},
                      "OPEN": {"questions": 1, "template_in_train": 1, "same_answer": 0}}
    assert "1 of 2 closed, 1 of 1 open; 1 of them with the same answer" in format_stats(
        {"splits": {}, "test_templated_in_train": counts})
    (tmp_path / "VQA_RAD_Dataset_Public.json").unlink()
    assert templated_in_train(tmp_path) is None  # MEVF's split files alone: nothing to tell templates by
