"""Familiarity and agreement (vqa.trust): was the question asked about this very image in training, in nearly the
same words, and answered as the model does? Scores beside trust, fitted into the calibrated confidence on validation
and stored in the bundle."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vqa.calibration import Calibration, coverage_at_risk, expected_calibration_error
from vqa.errors import DataError
from vqa.trust import TRUST_FILE, TrustScorer, image_id, image_ids

WORDS = ("lung liver kidney spleen heart brain femur rib aorta bowel bladder spine skull pelvis colon stomach "
         "trachea uterus ovary prostate").split()


def _memory(images: int = 60, seed: int = 0) -> tuple[TrustScorer, list[list[str]]]:
    """Two training questions about each of `images` images, on two organs of its own."""
    rng = np.random.default_rng(seed)
    organs = [list(rng.choice(WORDS, 2, replace=False)) for _ in range(images)]
    questions = [f"is the {o} enlarged?" for pair in organs for o in pair]
    ids = [f"img{i}" for i in range(images) for _ in range(2)]
    fused = torch.randn(len(ids), 8, generator=torch.Generator().manual_seed(seed))
    return TrustScorer.fit(fused, torch.arange(len(ids)) % 3, questions=questions, image_ids=ids), organs


def test_familiarity_is_the_word_overlap_with_what_training_asked_about_the_same_image(tmp_path):
    memory = TrustScorer.fit(torch.randn(4, 4), torch.tensor([0, 1, 1, -100]),
                             questions=["Is there a fracture of the left femur?", "What organ is shown?",
                                        "Is the liver enlarged?", "Is the left femur broken?"],
                             image_ids=["a", "a", "b", "a"])
    asked = ["Is there a fracture of the left femur?", "Is the left femur fractured?", "Is there a fracture of the "
             "left femur?", "Is the liver enlarged?"]
    got = memory.familiarity(asked, ["a", "a", "c", "a"]).tolist()
    assert got[0] == 1.0 and 0.0 < got[1] < 1.0  # {left, femur} of {fracture, left, femur, fractured}
    assert got[1] == pytest.approx(2 / 4)
    assert got[2] == 0.0 and got[3] == 0.0  # an image training never saw; a question asked about another image
    assert memory.feature_count == 3
    features = memory.features_of(torch.randn(4, 4), torch.tensor([0, 1, 1, 0]), asked, ["a", "a", "c", "a"])
    assert features.shape == (4, 3) and features[:, 1].tolist() == got
    # agreement: the overlap with those answered as predicted less with those answered otherwise
    # asked in these words and answered 0 in training, as predicted, less "...broken?" (answered outside the
    # vocabulary: otherwise), which shares 2 of their 4 words
    assert features[0, 2] == pytest.approx(1 - 2 / 4)
    assert features[1, 2] == pytest.approx(0 - 2 / 4)  # predicted 1: the one question so answered shares no word
    again = memory.familiarity_and_agreement(asked[:1], ["a"], predicted=[1])
    assert again.tolist() == [[1.0, -1.0]]  # the same question, answered otherwise in training
    with pytest.raises(DataError, match="familiarity"):
        memory.features_of(torch.randn(4, 4), torch.tensor([0, 1, 1, 0]))
    memory.save(tmp_path)
    loaded = TrustScorer.load(tmp_path)
    assert loaded.asked == memory.asked and loaded.familiarity(asked, ["a", "a", "c", "a"]).tolist() == got
    assert (frozenset({"left", "femur", "broken"}), -1) in loaded.asked["a"]  # an answer outside the vocabulary
    # a memory written before familiarity: trust scores alone
    TrustScorer(memory.features, memory.answers).save(tmp_path / "old")
    old = TrustScorer.load(tmp_path / "old")
    assert old.asked is None and old.feature_count == 1
    assert old.features_of(torch.randn(4, 4), torch.tensor([0, 1, 1, 0])).shape == (4, 1)


def test_an_image_is_the_same_by_its_pixels_whatever_it_arrives_as(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (40, 30), dtype=np.uint8)
    path = tmp_path / "scan.png"
    Image.fromarray(pixels).save(path)
    same = image_id(path)
    assert image_id(Image.open(path)) == same == image_id(Image.fromarray(pixels).convert("RGB"))
    changed = pixels.copy()
    changed[0, 0] ^= 1
    assert image_id(Image.fromarray(changed)) != same
    assert image_id(Image.fromarray(pixels.T.copy())) != same  # the same bytes in another shape
    assert image_ids([path, Image.fromarray(changed), path]) == [same, image_id(Image.fromarray(changed)), same]
    # a 16-bit scan: its file and the image opened from it are read to the same 8 bits (as the predictor reads both)
    deep = tmp_path / "scan16.png"
    Image.fromarray((pixels.astype(np.uint16) * 200).astype(np.uint16)).save(deep)
    assert image_id(deep) == image_id(Image.open(deep))


def _split(memory_organs: list[list[str]], n: int, seed: int):
    """Questions whose logits and fused vectors say nothing about being right, but which are right 95 % of the time
    when they restate a training question about their image and half of the time otherwise."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, len(memory_organs), n)
    familiar = rng.uniform(size=n) < 0.5
    questions = [f"is the {memory_organs[i][0]} enlarged?" if f else f"is the {rng.choice(WORDS)} calcified?"
                 for i, f in zip(images, familiar)]
    correct = rng.uniform(size=n) < np.where(familiar, 0.95, 0.5)
    logits = torch.from_numpy(rng.normal(size=(n, 3))).float()
    fused = torch.from_numpy(rng.normal(size=(n, 8))).float()
    return logits, fused, correct, questions, [f"img{i}" for i in images]


def test_familiarity_fitted_on_validation_answers_more_at_the_same_risk_on_test():
    memory, organs = _memory()
    val, test = _split(organs, 800, 1), _split(organs, 800, 2)
    branches = ["CLOSED"] * 800
    cal = Calibration.fit(val[0], branches, val[2], "validation", 0.1, trust=memory, fused=val[1],
                          questions=val[3], image_ids=val[4])
    weights = cal.trust_weights["CLOSED"]
    assert len(weights) == 5 and weights[3] > 1.0 and cal.reads_familiarity  # more familiar, more confident
    familiar = cal.confidence(test[0], branches, test[1], test[3], test[4]).numpy()
    alone = cal.temperature_confidence(test[0], branches).numpy()
    assert coverage_at_risk(familiar, test[2], 0.1) > coverage_at_risk(alone, test[2], 0.1) + 0.25
    assert expected_calibration_error(familiar, test[2]) < 0.06  # still a probability of being right
    assert "familiarity" in cal.to_dict()["method"]
    with pytest.raises(DataError, match="familiarity"):
        cal.confidence(test[0], branches, test[1])


def test_a_calibration_and_a_memory_that_disagree_on_familiarity_are_a_clear_error(tmp_path):
    memory, organs = _memory()
    val = _split(organs, 300, 3)
    cal = Calibration.fit(val[0], ["OPEN"] * 300, val[2], "validation", 0.1, trust=memory, fused=val[1],
                          questions=val[3], image_ids=val[4])
    stored = json.loads(json.dumps(cal.to_dict()))
    assert Calibration.from_dict(stored, trust=memory).trust_weights == cal.trust_weights
    old_memory = TrustScorer(memory.features, memory.answers)
    with pytest.raises(DataError, match=f"{TRUST_FILE} gives 1.*medvqa calibrate"):
        Calibration.from_dict(stored, trust=old_memory)
    # a bundle from before familiarity: three weights, a memory without questions; it loads and answers
    old = {**stored, "trust_weights": {b: w[:3] for b, w in stored["trust_weights"].items()}}
    loaded = Calibration.from_dict(old, trust=old_memory)
    assert not loaded.reads_familiarity and loaded.confidence(val[0], ["OPEN"] * 300, val[1]).shape == (300,)
    with pytest.raises(DataError, match=f"{TRUST_FILE} gives 3"):
        Calibration.from_dict(old, trust=memory)


def test_a_trained_bundle_reads_familiarity_from_the_question_and_the_image_it_is_given(trained_bundle,
                                                                                      predictor_phantom):
    from vqa import Predictor
    from vqa.data import load_records

    memory = TrustScorer.load(trained_bundle)
    assert memory.asked, "training stores what it asked about each image"
    weights = json.loads((trained_bundle / "calibration.json").read_text())["trust_weights"]
    assert all(len(w) == 5 for w in weights.values())
    predictor = Predictor.from_bundle(trained_bundle)
    assert predictor.describe()["familiarity"]
    assert "familiarity" in (trained_bundle / "README.md").read_text()  # the model card says what it reads
    record = load_records("vqa-rad", str(predictor_phantom / "vqa-rad"), "train")[0]
    image = Image.open(record.image)
    asked, new = (predictor.predict(im, q) for im, q in ((record.image, record.question),
                                                          (image, "zebra giraffe okapi?")))
    assert memory.familiarity([record.question], [image_id(record.image)]).item() == 1.0
    assert asked.familiarity == 1.0 and new.familiarity == 0.0 and asked.to_dict()["familiarity"] == 1.0
    assert (asked.agreement > 0) == (asked.answer == record.answer) and new.agreement == 0.0
    # the same pixels as a file or an uploaded image; the words make the difference, as the fit weighs them
    preds = predictor.predict(image, record.question)
    assert preds.confidence == pytest.approx(asked.confidence, abs=1e-6)
    assert 0.0 < new.confidence <= 1.0


def test_a_large_image_is_known_by_its_full_pixels_though_the_model_sees_it_reduced(trained_bundle,
                                                                                    predictor_phantom, tmp_path):
    """Training and eval know an image by its full pixels; the Predictor reduces one of 2048 px or more before the
    model sees it, and must still know it as training did (a radiograph of 3000 px, asked again)."""
    from vqa import Predictor
    from vqa.data import load_records

    record = load_records("vqa-rad", str(predictor_phantom / "vqa-rad"), "train")[0]
    large = tmp_path / "large.png"
    Image.open(record.image).resize((2300, 2100)).save(large)
    predictor = Predictor.from_bundle(trained_bundle)
    asked = predictor.calibration.trust.asked
    asked[image_id(large)] = asked[image_id(record.image)]  # as if training had asked about it at this size
    for given in (large, Image.open(large)):  # a file, an upload
        p = predictor.predict(given, record.question)
        assert p.image.size[0] <= 2048 and any("downscaled" in w for w in p.warnings)
        assert p.familiarity == 1.0


def test_the_demo_says_how_familiar_the_question_is(predictor, predictor_phantom):
    from demos.app import answer_question
    from vqa.data import load_records

    record = load_records("vqa-rad", str(predictor_phantom / "vqa-rad"), "train")[0]
    status = answer_question(predictor, str(record.image), record.question)[-1]
    assert "Familiarity 100%" in status
    assert "Familiarity 0%" in answer_question(predictor, str(record.image), "zebra giraffe okapi?")[-1]
