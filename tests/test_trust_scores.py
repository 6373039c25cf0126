"""Trust scores (vqa.trust): nearest training questions in the head's fused space, combined with the calibrated
confidence on validation, stored in the bundle."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from vqa.calibration import Calibration, coverage_at_risk, expected_calibration_error
from vqa.errors import DataError
from vqa.trust import TRUST_FILE, TrustScorer


def _clusters(n_per: int, answers: int, dim: int, seed: int, spread: float = 0.3):
    """Questions around one centre per answer: (fused (N, dim), answer ids (N,))."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(answers, dim, generator=torch.Generator().manual_seed(99))
    ids = torch.arange(answers).repeat_interleave(n_per)
    return centres[ids] + spread * torch.randn(len(ids), dim, generator=g), ids


def test_trust_is_high_where_the_neighbours_agree_and_low_where_they_do_not(tmp_path):
    fused, ids = _clusters(20, 3, 8, seed=0)
    scorer = TrustScorer.fit(fused, ids)
    probe, probe_ids = _clusters(5, 3, 8, seed=1)
    agree = scorer.score(probe, probe_ids)
    disagree = scorer.score(probe, (probe_ids + 1) % 3)
    assert (agree > 0).all() and (disagree < 0).all()
    # an answer no training question had is as far as the unit sphere allows: never trusted
    assert (scorer.score(probe, torch.full_like(probe_ids, 7)) < 0).all()
    scorer.save(tmp_path)
    loaded = TrustScorer.load(tmp_path)
    assert torch.allclose(loaded.score(probe, probe_ids), agree, atol=2e-2)  # stored in float16
    assert TrustScorer.load(tmp_path / "nowhere") is None


def test_fit_leaves_out_unknown_answers_and_caps_the_memory_deterministically(tmp_path):
    fused, ids = _clusters(30, 4, 6, seed=0)
    ids[:5] = -100  # answers outside the vocabulary (IGNORE_INDEX)
    scorer = TrustScorer.fit(fused, ids)
    assert len(scorer.answers) == len(ids) - 5 and (scorer.answers >= 0).all()
    small, again = TrustScorer.fit(fused, ids, max_rows=40), TrustScorer.fit(fused, ids, max_rows=40)
    assert len(small.answers) == 40 and torch.equal(small.features, again.features)
    assert torch.allclose(small.features.norm(dim=1), torch.ones(40), atol=2e-3)  # unit vectors, in float16
    small.save(tmp_path)  # what was fitted is what a loaded bundle scores with, to the bit
    loaded = TrustScorer.load(tmp_path)
    assert torch.equal(loaded.features, small.features) and torch.equal(loaded.answers, small.answers)


def test_a_damaged_trust_file_is_a_clear_error(tmp_path):
    (tmp_path / TRUST_FILE).write_bytes(b"not safetensors")
    with pytest.raises(DataError, match=TRUST_FILE):
        TrustScorer.load(tmp_path)


def _selective_split(n: int, seed: int):
    """Questions whose logits say nothing about being right (the same logits, their top one moved to the answer
    given), but whose answer is right exactly when it is the answer of their cluster of training questions."""
    g = torch.Generator().manual_seed(seed)
    fused, truth = _clusters(n // 3, 3, 8, seed=seed, spread=0.3)
    raw = torch.randn(len(truth), 3, generator=g) * 2
    wrong = torch.rand(len(truth), generator=g) < 0.4
    predicted = torch.where(wrong, (truth + 1) % 3, truth)
    logits = raw.clone()
    rows = torch.arange(len(truth))
    top = raw.argmax(1)
    logits[rows, predicted], logits[rows, top] = raw[rows, top], raw[rows, predicted]  # swap: the top moves
    return logits, fused, (predicted == truth).numpy()


def test_trust_weights_fitted_on_validation_answer_more_at_the_same_risk_on_test():
    memory = TrustScorer.fit(*_clusters(40, 3, 8, seed=5))
    val, test = _selective_split(600, 1), _selective_split(600, 2)
    cal = Calibration.fit(val[0], ["OPEN"] * len(val[2]), val[2], "validation", 0.1, trust=memory, fused=val[1])
    assert cal.uses_trust and cal.trust_weights["OPEN"][1] > 0  # more trust, more confidence
    with_trust = cal.confidence(test[0], ["OPEN"] * len(test[2]), test[1]).numpy()
    alone = cal.temperature_confidence(test[0], ["OPEN"] * len(test[2])).numpy()
    assert coverage_at_risk(with_trust, test[2], 0.05) > coverage_at_risk(alone, test[2], 0.05) + 0.3
    assert expected_calibration_error(with_trust, test[2]) < 0.08  # still a probability of being right
    with pytest.raises(DataError, match="fused vectors"):
        cal.confidence(test[0], ["OPEN"] * len(test[2]))
    # without a trust memory, or a branch with too few wrong answers, temperature scaling alone
    plain = Calibration.fit(val[0], ["OPEN"] * len(val[2]), val[2], "validation", 0.1)
    assert not plain.uses_trust and torch.equal(plain.confidence(test[0], ["OPEN"] * len(test[2]), test[1]),
                                                plain.temperature_confidence(test[0], ["OPEN"] * len(test[2])))
    few = Calibration.fit(val[0][:30], ["OPEN"] * 30, np.ones(30, dtype=bool), "validation", trust=memory,
                          fused=val[1][:30])
    assert not few.uses_trust and "trust_weights" not in few.to_dict()


def test_a_trained_bundle_stores_its_trust_memory_and_reports_what_it_adds(trained_bundle, predictor_phantom,
                                                                          tmp_path):
    from vqa.bundle import load
    from vqa.evaluate import evaluate, markdown_report

    bundle = load(trained_bundle, torch.device("cpu"))
    cal = bundle.calibration
    assert cal.uses_trust and (trained_bundle / TRUST_FILE).is_file()
    stored = json.loads((trained_bundle / "calibration.json").read_text())
    assert set(stored["trust_weights"]) <= set(stored["evidence"]) and "trust" in stored["method"]
    assert f"`{TRUST_FILE}`" in (trained_bundle / "README.md").read_text()
    from demos.app import _model_card
    from vqa import Predictor

    predictor = Predictor.from_bundle(trained_bundle)
    assert predictor.describe()["trust_scores"] and "(trust scores)" in _model_card(predictor)  # the demo says so
    report = evaluate(trained_bundle, "vqa-rad", str(predictor_phantom / "vqa-rad"), device="cpu",
                      cache_dir=str(tmp_path / "cache"), progress=False)[0]
    assert report["calibration"]["trust_scores"]
    for group in report["calibration"]["groups"].values():
        assert group["temperature_only"]["n"] == group["after"]["n"]
    assert "coverage, temperature scaling alone" in markdown_report(report)
    # the memory is part of the calibration: a bundle whose calibration names it and lacks the file is refused
    broken = tmp_path / "broken"
    shutil.copytree(trained_bundle, broken)
    (broken / TRUST_FILE).unlink()
    with pytest.raises(DataError, match=TRUST_FILE):
        load(broken, torch.device("cpu"))


def test_a_bundle_calibrated_before_trust_scores_answers_with_temperature_scaling(trained_bundle, predictor_phantom,
                                                                                 tmp_path):
    from vqa import Predictor
    from vqa.evaluate import evaluate

    from ._bundle import ground_truth

    old = tmp_path / "old"
    shutil.copytree(trained_bundle, old)
    (old / TRUST_FILE).unlink()
    stored = json.loads((old / "calibration.json").read_text())
    del stored["trust_weights"]
    (old / "calibration.json").write_text(json.dumps(stored))
    _, _, preds = evaluate(old, "vqa-rad", str(predictor_phantom / "vqa-rad"), device="cpu",
                           cache_dir=str(tmp_path / "cache"), progress=False)
    predictor = Predictor.from_bundle(old)
    assert not predictor.calibration.uses_trust and not predictor.describe()["trust_scores"]
    assert torch.equal(preds.confidence, predictor.calibration.temperature_confidence(preds.logits, preds.branches()))
    row = ground_truth(predictor_phantom)[0]
    p = predictor.predict(row["image"], row["question"])
    assert p.calibrated and 0.0 < p.confidence <= 1.0


def _strip_trust(bundle, folder):
    """A copy of `bundle` as trained before trust scores: temperature scaling only, no memory."""
    shutil.copytree(bundle, folder)
    (folder / TRUST_FILE).unlink()
    stored = json.loads((folder / "calibration.json").read_text())
    del stored["trust_weights"]
    (folder / "calibration.json").write_text(json.dumps(stored))
    return folder


def test_calibrate_gives_an_older_bundle_what_training_fits_now(trained_bundle, predictor_phantom, tmp_path):
    from vqa.cli import main as cli

    old = _strip_trust(trained_bundle, tmp_path / "old")
    (old / "README.md").unlink()
    data = str(predictor_phantom / "vqa-rad")
    assert cli(["calibrate", str(old), "--format", "vqa-rad", "--data", data, "--device", "cpu", "--no-progress",
                "--cache-dir", str(tmp_path / "cache")]) == 0
    fitted, trained = (json.loads((b / "calibration.json").read_text()) for b in (old, trained_bundle))
    # the same model, splits and features as at the end of training: the same temperatures, weights and evidence
    assert fitted["temperatures"] == pytest.approx(trained["temperatures"])
    for branch, weights in trained["trust_weights"].items():
        assert fitted["trust_weights"][branch] == pytest.approx(weights, rel=1e-3, abs=1e-4)
        assert fitted["evidence"][branch]["correct"] == trained["evidence"][branch]["correct"]
        assert fitted["evidence"][branch]["confidence"] == pytest.approx(trained["evidence"][branch]["confidence"],
                                                                          abs=1e-4)
    assert "medvqa calibrate" in fitted["fitted_on"] and (old / TRUST_FILE).is_file()
    assert f"`{TRUST_FILE}`" in (old / "README.md").read_text()
    memory, original = TrustScorer.load(old), TrustScorer.load(trained_bundle)
    assert torch.equal(memory.answers, original.answers)
    assert torch.allclose(memory.features, original.features, atol=1e-2)

    # an uncalibrated bundle becomes calibrated, into a copy; the source is left as it was
    bare = tmp_path / "bare"
    shutil.copytree(old, bare)
    for name in ("calibration.json", TRUST_FILE):
        (bare / name).unlink()
    assert cli(["calibrate", str(bare), "--format", "vqa-rad", "--data", data, "--device", "cpu", "--no-progress",
                "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "copy"), "--target-risk", "0.2"]) == 0
    assert not (bare / "calibration.json").exists()
    copy = json.loads((tmp_path / "copy" / "bundle" / "calibration.json").read_text())
    assert copy["target_risk"] == 0.2 and copy["trust_weights"] == fitted["trust_weights"]


def test_calibrate_refuses_a_refit_bundle_and_other_data(trained_bundle, predictor_phantom, tmp_path, capsys):
    from vqa.cli import main as cli

    refit = tmp_path / "refit"
    shutil.copytree(trained_bundle, refit)
    metrics = json.loads((refit / "metrics.json").read_text())
    (refit / "metrics.json").write_text(json.dumps({**metrics, "refit": {"epochs": 3}}))
    data = str(predictor_phantom / "vqa-rad")
    assert cli(["calibrate", str(refit), "--format", "vqa-rad", "--data", data, "--device", "cpu"]) == 2
    assert "--refit" in capsys.readouterr().err
    before = (trained_bundle / "calibration.json").read_text()
    assert cli(["calibrate", str(trained_bundle), "--format", "slake", "--data", data, "--device", "cpu"]) == 2
    assert "not the data" in capsys.readouterr().err
    assert (trained_bundle / "calibration.json").read_text() == before
    with pytest.raises(SystemExit):  # calibrated in fp32, the precision the Predictor answers in, whatever is asked
        cli(["calibrate", str(trained_bundle), "--format", "vqa-rad", "--data", data, "--precision", "bf16"])
    assert "unrecognized arguments: --precision" in capsys.readouterr().err
