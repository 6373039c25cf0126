"""Calibrated confidence, abstention at a target risk, out-of-scope images: fitted on validation, checked on test."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from vqa.calibration import (Calibration, calibration_metrics, coverage_at_risk, ece_of_calibrated,
                             expected_calibration_error, fit_temperature, risk_threshold)
from vqa.errors import DataError
from vqa.ood import photographs

RISK_TOLERANCE = 0.08  # realised test risk may exceed the validation target by this much (a few hundred answers)


from ._bundle import TARGET_RISK as TARGET


@pytest.fixture(scope="module")
def report(trained_bundle, predictor_phantom, tmp_path_factory):
    from vqa.evaluate import evaluate, write_outputs

    from ._bundle import feature_cache_copy

    tmp = tmp_path_factory.mktemp("trust")
    result = evaluate(trained_bundle, "vqa-rad", str(predictor_phantom / "vqa-rad"), device="cpu",
                      cache_dir=str(feature_cache_copy(trained_bundle, tmp / "cache")), progress=False,
                      target_risk=TARGET)
    write_outputs(*result, tmp / "eval")
    return result[0], tmp / "eval"


def test_metrics_match_their_definitions():
    conf = np.array([0.9, 0.8, 0.6, 0.3])
    correct = np.array([1, 1, 0, 0])
    # bins of width 1/15: each question alone in its bin -> mean |accuracy - confidence|
    assert expected_calibration_error(conf, correct) == pytest.approx((0.1 + 0.2 + 0.6 + 0.3) / 4)
    assert coverage_at_risk(conf, correct, 0.0) == 0.5 and coverage_at_risk(conf, correct, 0.34) == 0.75
    assert risk_threshold(conf, correct, 0.0, delta=0) == 0.8  # the empirical risk
    assert risk_threshold(conf, 1 - correct, 0.0, delta=0) == float("inf")
    # with the upper bound, 2 right answers out of 2 are not evidence enough for a 10 % risk; 40 of 40 are
    assert risk_threshold(conf, correct, 0.1) == float("inf")
    many = np.linspace(1, 0.5, 40)
    assert risk_threshold(many, np.ones(40), 0.1) == pytest.approx(0.5)


def test_a_threshold_keeps_all_of_a_tie_or_none_of_it():
    """A threshold answers every question at its confidence: where a tie straddles the cut, the risk is the whole
    tie's, whatever order validation listed it in."""
    conf, correct = np.array([0.9, 0.8, 0.8]), np.array([1, 1, 0])
    assert risk_threshold(conf, correct, 0.05, delta=0) == 0.9  # at 0.8, a third of the answers kept are wrong
    assert coverage_at_risk(conf, correct, 0.05) == pytest.approx(1 / 3)
    # saturated confidences: 30 right then 10 wrong at 1.0 are one tie, 25 % wrong (the first 30 alone would pass
    # a 10 % target even with their bound, 7.4 %); 60 right below them bring the whole 100 to 10 % wrong
    saturated = np.concatenate([np.ones(40), np.linspace(0.99, 0.9, 60)])
    outcome = np.concatenate([np.ones(30), np.zeros(10), np.ones(60)])
    assert risk_threshold(saturated, outcome, 0.1) == float("inf")  # 10 of 100 wrong: its bound is above 10 %
    assert risk_threshold(saturated, outcome, 0.05, delta=0) == float("inf")
    assert risk_threshold(saturated, outcome, 0.1, delta=0) == pytest.approx(0.9)
    assert coverage_at_risk(saturated, outcome, 0.2) == 1.0 and coverage_at_risk(saturated, outcome, 0.05) == 0.0


def test_a_calibrated_models_ece_is_sampling_noise():
    # all 400 answers at confidence 0.5, one bin: ECE = |share right - 0.5|, whose mean over draws is
    # sqrt(0.25 / n) * sqrt(2 / pi) for a model right half of the time
    floor = ece_of_calibrated(np.full(400, 0.5))
    assert floor.mean() == pytest.approx(0.5 / 20 * np.sqrt(2 / np.pi), rel=0.08)
    assert np.array_equal(floor, ece_of_calibrated(np.full(400, 0.5)))  # deterministic
    assert ece_of_calibrated(np.ones(50)).max() == 0.0  # always right at confidence 1: nothing to miss
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.5, 1.0, 300)
    calibrated = (rng.uniform(size=300) < conf).astype(float)
    overconfident = (rng.uniform(size=300) < conf - 0.15).astype(float)
    honest, off = calibration_metrics(conf, calibrated, []), calibration_metrics(conf, overconfident, [])
    assert honest["ece_if_calibrated"]["share_at_or_above"] > 0.05  # indistinguishable from noise
    assert off["ece_if_calibrated"]["share_at_or_above"] < 0.01 and off["ece"] > off["ece_if_calibrated"]["p90"]
    # more questions, less noise: the floor falls as 1 / sqrt(n)
    assert ece_of_calibrated(rng.uniform(0.5, 1.0, 30000)).mean() < ece_of_calibrated(conf).mean() / 5


def test_temperature_fits_overconfident_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(400, 5, generator=g) * 8  # very peaked
    correct = (torch.rand(400, generator=g) < 0.5).numpy().astype(float)  # right half of the time
    assert fit_temperature(logits, correct) > 3.0  # flattened towards 50 % confidence


def test_calibration_lowers_ece_on_held_out_questions(report):
    groups = report[0]["calibration"]["groups"]
    assert report[0]["calibration"]["calibrated"]
    for name in ("CLOSED", "OPEN"):
        before, after = groups[name]["before"]["ece"], groups[name]["after"]["ece"]
        assert after < before, (name, before, after)
    for name in ("reliability.png", "risk_coverage.png"):
        assert (report[1] / name).stat().st_size > 5_000
    assert "## Confidence (calibrated on validation)" in (report[1] / "report.md").read_text()
    line = json.loads((report[1] / "predictions.jsonl").read_text().splitlines()[0])
    assert 0.0 <= line["confidence"] <= 1.0 and isinstance(line["abstained"], bool)


def test_the_risk_target_chosen_on_validation_holds_on_test(report):
    abstention = report[0]["calibration"]["abstention"]
    target = abstention["target_risk"]
    assert target == TARGET
    for name in ("CLOSED", "OPEN"):
        group = abstention[name]
        assert group["coverage"] > 0.2, (name, group)  # it answers a fair share
        assert group["risk"] <= target + RISK_TOLERANCE, (name, group, target)
        # and it withholds: answering everything would be wrong more often (measured 0.38 / 0.37 against 0.28 /
        # 0.19 answered), so a threshold that never bites cannot pass on the tolerance
        everything = 1 - report[0]["subsets"]["all"][name.lower()]
        assert group["coverage"] < 1.0 and group["risk"] < everything - 0.03, (name, group, everything)


@pytest.mark.parametrize("n, dim", [(40, 96), (300, 24)])  # fewer images than dimensions, and more
def test_detector_distance_is_ledoit_wolf_mahalanobis(tmp_path, n, dim):
    """The stored low-rank form scores exactly as the full shrunk precision, is small, and reads old files."""
    from safetensors.torch import save_file
    from sklearn.covariance import LedoitWolf

    from vqa.ood import OOD_FILE, OutOfScopeDetector

    rng = np.random.default_rng(0)
    train = rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim))  # correlated features
    queries = rng.normal(size=(7, dim)) * 3
    expected = np.sqrt(LedoitWolf().fit(train).mahalanobis(queries))
    detector = OutOfScopeDetector.fit(torch.from_numpy(train))
    assert detector.score(torch.from_numpy(queries)).numpy() == pytest.approx(expected, rel=1e-4)
    if n < dim:
        assert detector.basis.shape == (dim, n - 1)  # the centred sample covariance's rank
    detector.save(tmp_path)
    again = OutOfScopeDetector.load(tmp_path)
    assert again.score(torch.from_numpy(queries)).numpy() == pytest.approx(expected, rel=1e-4)

    lw = LedoitWolf().fit(train)  # a bundle written before the low-rank form stored the full precision
    save_file({"mean": torch.from_numpy(lw.location_).float(), "precision": torch.from_numpy(lw.precision_).float(),
               "threshold": torch.tensor([1.0]), "quantile": torch.tensor([0.99])}, str(tmp_path / OOD_FILE))
    legacy = OutOfScopeDetector.load(tmp_path)
    assert legacy.score(torch.from_numpy(queries)).numpy() == pytest.approx(expected, rel=1e-3)


def test_predictions_carry_confidence_and_abstain_on_an_unknown_question(predictor, predictor_phantom):
    from ._bundle import known_answer

    row = known_answer(predictor, predictor_phantom)
    p = predictor.predict(row["image"], row["question"])
    assert p.calibrated and 0.0 < p.confidence <= 1.0 and not p.abstained
    assert p.to_dict()["confidence"] == round(p.confidence, 6) and p.to_dict()["target_risk"] == TARGET
    gibberish = predictor.predict(row["image"], "Zorblat quinx fremmel wobbly?")
    assert gibberish.abstained and "unknown to the model" in gibberish.abstain_reason
    strict = type(predictor).from_bundle(predictor.path, target_risk=0.001)  # a stricter target abstains more
    many = [strict.predict(row["image"], q).abstained for q in ("Is there a lesion?", row["question"])]
    loose = [predictor.predict(row["image"], q).abstained for q in ("Is there a lesion?", row["question"])]
    # 0.1 % is out of reach of a validation split this small: nothing is answered (the loose target answered one)
    assert all(many) and sum(many) > sum(loose)


def test_a_branch_validation_never_answered_is_withheld_for_that_reason(predictor, predictor_phantom):
    """No threshold exists for a branch without validation answers (a head without a router whose validation never
    said yes or no, say): its answers are withheld, and the reason says so rather than blaming the target."""
    from ._bundle import known_answer

    row = known_answer(predictor, predictor_phantom)
    again = type(predictor).from_bundle(predictor.path)
    branch = again.predict(row["image"], row["question"]).question_type
    again.calibration.evidence[branch] = {"confidence": [], "correct": []}
    p = again.predict(row["image"], row["question"])
    assert p.abstained and p.abstain_reason == (f"validation gave no {branch.lower()} answers, so nothing shows how "
                                                "often they are right")


def _photographs() -> list[Path]:
    pytest.importorskip("skimage")
    return photographs()


def test_out_of_scope_detector_separates_photographs_from_the_training_kind(predictor, predictor_phantom):
    from sklearn.metrics import roc_auc_score

    from ._bundle import ground_truth

    photos = _photographs()
    if len(photos) < 4:
        pytest.skip("scikit-image's sample photographs are not installed")
    phantom = list(dict.fromkeys(r["image"] for r in ground_truth(predictor_phantom)))[:40]
    scores = [p.out_of_scope_score for p in predictor.predict_batch(phantom + photos, ["Is there a lesion?"] *
                                                                    (len(phantom) + len(photos)))]
    labels = [0] * len(phantom) + [1] * len(photos)
    # measured 0.92 with this test bundle's random tiny encoder (the Hubble deep field, dark with bright dots,
    # passes as a phantom); docs/results.md measures the 0.95 target with trained encoders on real images
    assert roc_auc_score(labels, scores) >= 0.9
    photo = predictor.predict(photos[0], "Is there a lesion?")
    assert photo.abstained and "unlike the training images" in photo.abstain_reason


def test_a_blank_frame_is_out_of_scope_whatever_its_features(predictor, predictor_phantom, tmp_path):
    """Uniform frames (black, grey, white; one with a small label) are withheld as blank, by the Predictor and by
    eval alike; a scan is not."""
    from PIL import Image

    from vqa.data import load_vqa_rad
    from vqa.evaluate import evaluate

    from ._bundle import feature_cache_copy, known_answer

    labelled = Image.new("L", (160, 160), 0)
    labelled.paste(255, (4, 4, 14, 12))  # a burnt-in label on a blank frame: 0.3 % of the pixels
    frames = [Image.new("L", (128, 128), v) for v in (0, 128, 255)] + [labelled, Image.new("RGB", (96, 64), "navy")]
    got = predictor.predict_batch(frames, ["Is there a lesion?"] * len(frames))
    assert all(p.abstained and p.abstain_reason.startswith("the image is blank") for p in got)
    row = known_answer(predictor, predictor_phantom)
    assert not predictor.predict(row["image"], row["question"]).abstained

    data = shutil.copytree(predictor_phantom / "vqa-rad", tmp_path / "vqa-rad")
    records = load_vqa_rad(data, "test")
    Image.new("L", (256, 256), 0).save(records[0].image, format="JPEG")  # one test image blanked out
    cache = feature_cache_copy(predictor.path, tmp_path / "cache")  # the blanked image is the only new one
    _, scored, preds = evaluate(predictor.path, "vqa-rad", str(data), device="cpu", cache_dir=str(cache),
                                progress=False)
    blanked = [r.image == records[0].image for r in scored]
    assert any(blanked) and all(preds.out_of_scope[i] and preds.abstained[i] for i, b in enumerate(blanked) if b)
    again = predictor.predict_batch([r.image for r in scored], [r.question for r in scored])
    assert [p.abstain_reason is not None and p.abstain_reason.startswith("the image is blank") for p in again] == \
        blanked


def test_eval_withholds_a_question_of_unknown_words_as_the_predictor_does(predictor, predictor_phantom, tmp_path):
    from vqa.evaluate import evaluate

    from ._bundle import feature_cache_copy

    data = shutil.copytree(predictor_phantom / "vqa-rad", tmp_path / "vqa-rad")
    test = json.loads((data / "testset.json").read_text())
    test[0]["question"] = "Zorblat quinx fremmel wobbly?"
    (data / "testset.json").write_text(json.dumps(test))
    # a target so loose that confidence alone would not withhold it
    _, scored, preds = evaluate(predictor.path, "vqa-rad", str(data), device="cpu", target_risk=0.99,
                                cache_dir=str(feature_cache_copy(predictor.path, tmp_path / "cache")), progress=False)
    gibberish = [r.question == test[0]["question"] for r in scored]
    assert sum(gibberish) == 1 and bool(preds.abstained[gibberish.index(True)])
    again = type(predictor).from_bundle(predictor.path, target_risk=0.99).predict_batch(
        [r.image for r in scored], [r.question for r in scored])
    assert [p.abstained for p in again] == preds.abstained.tolist()
    assert "unknown to the model" in again[gibberish.index(True)].abstain_reason


def test_a_bundle_from_before_calibration_still_answers(trained_bundle, tmp_path, predictor_phantom):
    from vqa import Predictor

    from ._bundle import ground_truth

    old = tmp_path / "old-bundle"
    shutil.copytree(trained_bundle, old)
    (old / "calibration.json").unlink()
    (old / "ood.safetensors").unlink()
    predictor = Predictor.from_bundle(old)
    row = ground_truth(predictor_phantom)[0]
    p = predictor.predict(row["image"], row["question"])
    assert not p.calibrated and not p.abstained and p.confidence == pytest.approx(p.score)
    assert not predictor.describe()["calibrated"]
    assert not predictor.predict(row["image"], "Zorblat quinx fremmel wobbly?").abstained  # it withholds nothing


def test_target_risk_outside_zero_one_is_a_clear_error(trained_bundle, predictor_phantom, capsys, tmp_path):
    from vqa.cli import main as cli

    row = next(iter(__import__("tests._bundle", fromlist=["ground_truth"]).ground_truth(predictor_phantom)))
    code = cli(["predict", "--bundle", str(trained_bundle), "--image", str(row["image"]), "--question", "Is it?",
                "--target-risk", "1.5"])
    assert code == 2 and "--target-risk 1.5" in capsys.readouterr().err
    code = cli(["train", "--data", str(predictor_phantom / "vqa-rad"), "--target-risk", "0", "--epochs", "1",
                "--out", str(tmp_path / "never-written"), "--no-progress"])
    assert code == 2 and "strictly between 0 and 1" in capsys.readouterr().err
    assert not (tmp_path / "never-written").exists()
    with pytest.raises(DataError, match="not a medvqa calibration"):
        Calibration.from_dict({"temperatures": "warm"})
