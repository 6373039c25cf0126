"""Abstention targets per branch: closed answers held to a tighter risk than open ones, end to end."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from vqa.calibration import Calibration, risk_threshold
from vqa.errors import DataError
from vqa.target_risk import TargetRisk, reported_target

from ._bundle import TARGET_RISK, ground_truth


@pytest.mark.parametrize("text, default, closed, open_, choice", [
    ("0.1", 0.1, 0.1, 0.1, 0.1),
    ("closed=0.05,open=0.2", 0.1, 0.05, 0.2, 0.1),
    ("0.3, Closed = 0.05", 0.3, 0.05, 0.3, 0.3),
    ("open=0.25,choice=0.15", 0.1, 0.1, 0.25, 0.15),
])
def test_parse_reads_one_share_or_one_per_branch(text, default, closed, open_, choice):
    risk = TargetRisk.parse(text)
    assert (risk.default, risk.of("CLOSED"), risk.of("OPEN"), risk.of("CHOICE")) == (default, closed, open_, choice)
    assert TargetRisk.parse(str(risk)) == risk  # str is the text parse reads
    assert TargetRisk.from_json(json.loads(json.dumps(risk.to_json())), "calibration.json") == risk


def test_a_stored_number_is_every_branch_and_stays_a_number():
    assert TargetRisk.from_json(0.2, "calibration.json") == TargetRisk(0.2) == TargetRisk.parse(0.2)
    assert TargetRisk(0.2).to_json() == 0.2  # what bundles before per-branch targets stored


def test_describe_names_each_branch_only_when_they_differ():
    risk = TargetRisk.parse("closed=0.05,open=0.2")
    assert risk.describe(["OPEN", "CLOSED"]) == "5% (closed) / 20% (open)"
    assert risk.describe(["CHOICE"]) == "10%"
    assert risk.describe() == "5% (closed) / 20% (open) / 10% (otherwise)"
    assert TargetRisk.parse("closed=0.1").describe(["CLOSED", "OPEN"]) == "10%"
    assert reported_target({"target_risk": {"default": 0.1, "CLOSED": 0.05}, "CLOSED": {}, "OPEN": {}}) \
        == "5% (closed) / 10% (open)"


@pytest.mark.parametrize("text, message", [
    ("1.5", "--target-risk 1.5: expected a share of wrong answers strictly between 0 and 1"),
    ("closed=0", "--target-risk closed=0.0: expected a share"),
    ("clsoed=0.05", "unknown branch 'clsoed'; expected one of closed, open, choice"),
    ("closed:0.05", "'closed:0.05' is not a number"),
])
def test_a_bad_target_names_what_is_wrong(text, message):
    with pytest.raises(DataError, match=message.replace("(", r"\(")):
        TargetRisk.parse(text)
    with pytest.raises(DataError, match="calibration.json: target_risk"):
        TargetRisk.from_json({"default": 0.1, "CLOSED": "tight"}, "calibration.json")


def test_each_branch_keeps_the_threshold_of_its_own_target():
    rng = np.random.default_rng(0)
    evidence = {}
    for branch in ("CLOSED", "OPEN"):
        conf = rng.uniform(0.3, 1.0, 400)
        evidence[branch] = {"confidence": conf.round(6).tolist(), "correct": (rng.uniform(size=400) < conf).tolist()}
    cal = Calibration({"CLOSED": 1.0, "OPEN": 1.0}, TargetRisk.parse("closed=0.05,open=0.3"), evidence)
    for branch, risk in (("CLOSED", 0.05), ("OPEN", 0.3)):
        ev = evidence[branch]
        assert cal.threshold(branch) == risk_threshold(np.array(ev["confidence"]), np.array(ev["correct"]), risk)
    assert cal.threshold("CLOSED") > cal.threshold("OPEN")
    stored = json.loads(json.dumps(cal.to_dict()))
    assert stored["target_risk"] == {"default": 0.1, "CLOSED": 0.05, "OPEN": 0.3}
    assert Calibration.from_dict(stored).threshold("OPEN") == cal.threshold("OPEN")


def test_predictor_abstains_per_branch(predictor, predictor_phantom):
    from vqa import Predictor

    rows = ground_truth(predictor_phantom)[:60]
    images, questions = [r["image"] for r in rows], [r["question"] for r in rows]
    strict_closed = Predictor.from_bundle(predictor.path, target_risk="closed=0.01,open=0.6")
    strict_open = Predictor.from_bundle(predictor.path, target_risk="closed=0.6,open=0.01")
    assert strict_closed.describe()["target_risk"] == "1% (closed) / 60% (open)"
    cal = predictor.calibration
    for p in (strict_closed, strict_open):
        for branch in ("CLOSED", "OPEN"):
            assert p.threshold(branch) == cal.threshold(branch, TargetRisk(p.target_risk.of(branch)))
    a = strict_closed.predict_batch(images, questions)
    b = strict_open.predict_batch(images, questions)
    branch = ["CLOSED" if p.question_type == "CLOSED" else "OPEN" for p in a]  # the router's type is the branch
    assert [p.target_risk for p in a] == [0.01 if x == "CLOSED" else 0.6 for x in branch]
    withheld = {(name, x): sum(p.abstained for p, y in zip(preds, branch) if y == x)
                for name, preds in (("a", a), ("b", b)) for x in ("CLOSED", "OPEN")}
    assert {"CLOSED", "OPEN"} <= set(branch)
    # a 1% target withholds at least what a 60% one does, branch by branch, and somewhere strictly more
    assert withheld["a", "CLOSED"] >= withheld["b", "CLOSED"] and withheld["b", "OPEN"] >= withheld["a", "OPEN"]
    assert withheld["a", "CLOSED"] + withheld["b", "OPEN"] > withheld["b", "CLOSED"] + withheld["a", "OPEN"]


def test_cli_writes_each_answers_own_target_and_refuses_a_typo(trained_bundle, predictor_phantom, tmp_path, capsys):
    from vqa.cli import main as cli

    row = ground_truth(predictor_phantom)[0]
    code = cli(["predict", "--bundle", str(trained_bundle), "--image", str(row["image"]),
                "--question", row["question"], "--target-risk", "closed=0.05,open=0.25"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["target_risk"] == (0.05 if out["question_type"] == "CLOSED" else 0.25)
    code = cli(["predict", "--bundle", str(trained_bundle), "--image", str(row["image"]),
                "--question", row["question"], "--target-risk", "clsoed=0.05"])
    assert code == 2 and "unknown branch 'clsoed'" in capsys.readouterr().err
    bare = tmp_path / "uncalibrated"  # it withholds nothing: a target beside its answers would say otherwise
    shutil.copytree(trained_bundle, bare)
    (bare / "calibration.json").unlink()
    code = cli(["predict", "--bundle", str(bare), "--image", str(row["image"]), "--question", row["question"],
                "--target-risk", "0.05"])
    assert code == 2 and "uncalibrated bundle withholds no answer" in capsys.readouterr().err
    assert cli(["predict", "--bundle", str(bare), "--image", str(row["image"]), "--question", row["question"]]) == 0
    assert json.loads(capsys.readouterr().out)["target_risk"] is None
    code = cli(["train", "--data", str(predictor_phantom / "vqa-rad"), "--target-risk", "open=1", "--epochs", "1",
                "--out", str(tmp_path / "never-written"), "--no-progress"])
    assert code == 2 and "--target-risk open=1.0" in capsys.readouterr().err
    assert not (tmp_path / "never-written").exists()


def test_evaluation_reports_the_per_branch_target(trained_bundle, predictor_phantom, tmp_path):
    from vqa.evaluate import evaluate, write_outputs

    result = evaluate(trained_bundle, "vqa-rad", str(predictor_phantom / "vqa-rad"), device="cpu",
                      cache_dir=str(tmp_path / "cache"), progress=False, target_risk=f"open={TARGET_RISK}")
    abstention = result[0]["calibration"]["abstention"]
    assert abstention["target_risk"] == {"default": 0.1, "OPEN": TARGET_RISK}
    write_outputs(*result, tmp_path / "eval")
    assert f"Abstention at target risk 10% (closed) / {TARGET_RISK:.0%} (open)" in (tmp_path / "eval/report.md").read_text()
