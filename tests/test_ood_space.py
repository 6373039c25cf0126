"""The out-of-scope detector in a feature space of its own (--ood-encoder): fitted by train and calibrate, stored in
the bundle, scored alike by eval, the Predictor and the ONNX runtime."""
from __future__ import annotations

import dataclasses
import json
import shutil


import pytest
import torch
from safetensors import safe_open

from vqa.errors import DataError
from vqa.ood import ENCODER_FOLDER, MODEL_SPACE, OOD_FILE, OutOfScopeDetector, detector_encoder

from ._bundle import feature_cache_copy, ground_truth


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    """A frozen encoder other than the test bundle's, saved as a folder (stored in the bundle by copy, not by name)."""
    from encoders import create_encoder

    torch.manual_seed(11)
    folder = tmp_path_factory.mktemp("space") / "tiny-space"
    create_encoder("clip-vit-tiny", image_size=48).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def refitted(trained_bundle, predictor_phantom, space, tmp_path_factory):
    """A copy of the test bundle whose detector `medvqa calibrate --ood-encoder` fitted again in `space`."""
    from vqa.cli import main as cli

    tmp = tmp_path_factory.mktemp("refitted")
    cache = feature_cache_copy(trained_bundle, tmp / "cache")
    assert cli(["calibrate", str(trained_bundle), "--format", "vqa-rad", "--data", str(predictor_phantom / "vqa-rad"),
                "--device", "cpu", "--no-progress", "--cache-dir", str(cache), "--ood-encoder", str(space),
                "--out", str(tmp / "copy")]) == 0
    return tmp / "copy" / "bundle"


def _space_of(bundle) -> str:
    with safe_open(str(bundle / OOD_FILE), "pt") as f:
        return f.metadata()["space"]


def test_calibrate_fits_the_detector_in_the_named_space_and_the_predictor_scores_there(
        refitted, trained_bundle, predictor, predictor_phantom, space):
    from encoders import load_encoder_folder
    from vqa import Predictor

    # a folder's encoder is copied in (a registered one with packaged weights would be stored by name)
    assert (refitted / ENCODER_FOLDER / "model.safetensors").is_file() and _space_of(refitted) == "clip-vit-tiny"
    assert _space_of(trained_bundle) == MODEL_SPACE and f"`{ENCODER_FOLDER}/`" in (refitted / "README.md").read_text()
    moved = Predictor.from_bundle(refitted)
    assert moved.describe()["out_of_scope_space"] == "clip-vit-tiny (its own, frozen)"
    images = list(dict.fromkeys(r["image"] for r in ground_truth(predictor_phantom)))[:6]
    questions = ["Is there a lesion?"] * len(images)
    got, before = moved.predict_batch(images, questions), predictor.predict_batch(images, questions)
    assert [p.answer for p in got] == [p.answer for p in before]  # the network is untouched
    # the scores are the detector's distances in the named encoder's space, not in the model's
    pooled = load_encoder_folder(space).eval().encode(images)["pooled"].float()
    expected = OutOfScopeDetector.load(refitted).score(pooled)
    assert [p.out_of_scope_score for p in got] == pytest.approx(expected.tolist(), rel=1e-5)
    assert [p.out_of_scope_score for p in got] != pytest.approx([p.out_of_scope_score for p in before], rel=1e-2)


def test_eval_and_onnx_flag_what_the_predictor_flags(refitted, trained_bundle, predictor_phantom, tmp_path):
    pytest.importorskip("onnxruntime")
    from vqa import Predictor
    from vqa.data import load_vqa_rad
    from vqa.evaluate import evaluate
    from vqa.onnx_export import OOD_ENCODER_FILE, export_onnx

    records = load_vqa_rad(predictor_phantom / "vqa-rad", "test")[:40]
    scores = [p.out_of_scope_score for p in Predictor.from_bundle(refitted).predict_batch(
        [r.image for r in records], [r.question for r in records])]
    # The phantom's test images are all in scope at the fitted threshold: one in the widest gap between the middle
    # half of their scores flags some of them, and eval's float16-cached features cannot cross it.
    moved = shutil.copytree(refitted, tmp_path / "moved")
    ordered = sorted(scores)
    gap = max(range(len(ordered) // 4, 3 * len(ordered) // 4), key=lambda k: ordered[k + 1] - ordered[k])
    threshold = (ordered[gap] + ordered[gap + 1]) / 2
    dataclasses.replace(OutOfScopeDetector.load(moved), threshold=threshold).save(moved)
    flags = [s > threshold for s in scores]
    assert 0 < sum(flags) < len(flags)
    _, evaluated, preds = evaluate(moved, "vqa-rad", str(predictor_phantom / "vqa-rad"), device="cpu",
                                   cache_dir=str(feature_cache_copy(trained_bundle, tmp_path / "cache")),
                                   progress=False)
    assert [r.source_id for r in evaluated[:40]] == [r.source_id for r in records]
    assert preds.out_of_scope[:40].tolist() == flags
    torch_predictor = Predictor.from_bundle(moved)  # the Predictor reads the moved threshold, and the same scores
    assert torch_predictor.ood.threshold == pytest.approx(threshold) and [p.out_of_scope_score for p in (
        torch_predictor.predict_batch([r.image for r in records], [r.question for r in records]))] == pytest.approx(
        scores, rel=1e-6)

    report = export_onnx(moved, tmp_path / "onnx")
    assert (tmp_path / "onnx" / OOD_ENCODER_FILE).is_file() and report.max_abs_diff["ood_pooled"] < 1e-4
    assert not (tmp_path / "onnx" / ENCODER_FOLDER).exists()  # the graph runs it, not PyTorch
    onnx = Predictor.from_onnx(tmp_path / "onnx")
    got = [p.out_of_scope_score for p in onnx.predict_batch([r.image for r in records[:8]],
                                                            [r.question for r in records[:8]])]
    assert got == pytest.approx(scores[:8], rel=1e-3)
    # an export from before detector graphs (or before fused outputs, under a trust calibration) is refused when
    # loaded, not at every question
    older = shutil.copytree(tmp_path / "onnx", tmp_path / "older")
    config = json.loads((older / "config.json").read_text())
    del config["onnx"]["ood_encoder"]
    (older / "config.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match="out-of-scope detector reads clip-vit-tiny .* export the bundle again"):
        Predictor.from_onnx(older)
    assert onnx.calibration.uses_trust  # the test bundle's QCR head gives fused vectors: trust scores
    config = json.loads((tmp_path / "onnx" / "config.json").read_text())
    config["onnx"]["head"]["outputs"].remove("fused")
    (older / "config.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match="trust scores, which read the head's fused vectors"):
        Predictor.from_onnx(older)


def test_calibrate_back_to_the_models_space_removes_the_encoder(refitted, trained_bundle, predictor_phantom,
                                                                  tmp_path):
    from vqa.cli import main as cli

    back = tmp_path / "back"
    shutil.copytree(refitted, back)
    assert cli(["calibrate", str(back), "--format", "vqa-rad", "--data", str(predictor_phantom / "vqa-rad"),
                "--device", "cpu", "--no-progress",
                "--cache-dir", str(feature_cache_copy(trained_bundle, tmp_path / "cache")),
                "--ood-encoder", MODEL_SPACE]) == 0
    assert not (back / ENCODER_FOLDER).exists() and _space_of(back) == MODEL_SPACE
    again, trained = OutOfScopeDetector.load(back), OutOfScopeDetector.load(trained_bundle)
    assert again.threshold == pytest.approx(trained.threshold, rel=1e-4)  # the detector training fitted


def test_a_bundle_missing_its_detectors_encoder_is_named(refitted, tmp_path):
    from vqa import Predictor

    broken = tmp_path / "broken"
    shutil.copytree(refitted, broken)
    shutil.rmtree(broken / ENCODER_FOLDER)
    with pytest.raises(DataError, match=f"{ENCODER_FOLDER}/\\) is missing"):
        Predictor.from_bundle(broken)


def test_a_detectors_encoder_that_is_not_the_one_it_was_fitted_on_is_refused(refitted, tmp_path):
    """Its encoder and its statistics are written one after the other: a pair that does not belong together (a
    calibration stopped between them) is refused, not scored in the wrong space."""
    from encoders import create_encoder, load_encoder_folder

    assert OutOfScopeDetector.load(refitted).encoder.fingerprint() == load_encoder_folder(
        refitted / ENCODER_FOLDER).fingerprint()  # the stored pair loads, its encoder as fitted
    broken = shutil.copytree(refitted, tmp_path / "broken")
    torch.manual_seed(12)  # the same architecture and feature size, other weights
    create_encoder("clip-vit-tiny", image_size=48).save_pretrained(broken / ENCODER_FOLDER)
    with pytest.raises(DataError, match=f"{ENCODER_FOLDER}: not the encoder .*ood.safetensors was fitted on"):
        OutOfScopeDetector.load(broken)


def test_a_detector_in_a_folders_space_names_no_local_folder(refitted, tmp_path):
    from encoders import load_encoder_folder

    fitted = OutOfScopeDetector.fit(torch.randn(20, 4), encoder=load_encoder_folder(refitted / ENCODER_FOLDER))
    assert fitted.space == "clip-vit-tiny"  # its registered name, kept
    moved = dataclasses.replace(fitted, space="local-dir:/home/alice/private/clip")  # a bundle from before
    assert moved.describe_space() == "local:clip (its own, frozen)"


def test_the_models_own_encoder_by_name_reads_the_models_features(space):
    from encoders import load_encoder_folder

    own = load_encoder_folder(space)
    own.freeze()
    assert detector_encoder(str(space), own) is None and detector_encoder(MODEL_SPACE, own) is None
    assert detector_encoder(str(space), load_encoder_folder(space)) is not None  # not frozen: it will change
    with pytest.raises(DataError, match="--ood-encoder 'no-such-encoder'"):
        detector_encoder("no-such-encoder", own)


def test_train_fits_the_detector_in_the_named_space(trained_bundle, predictor_phantom, space, tmp_path, capsys):
    from vqa.cli import main as cli

    common = ["train", "--data", str(predictor_phantom / "vqa-rad"), "--head", "mevf-san", "--head-arg", "hidden_dim=32",
              "--embed-dim", "32", "--question-dim", "32", "--epochs", "1", "--device", "cpu", "--no-progress",
              "--cache-dir", str(feature_cache_copy(trained_bundle, tmp_path / "cache"))]
    assert cli(common + ["--ood-encoder", "no-such-encoder", "--out", str(tmp_path / "bad")]) == 2
    assert "--ood-encoder 'no-such-encoder'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # refused before anything was written
    assert cli(common + ["--ood-encoder", str(space), "--out", str(tmp_path / "run")]) == 0
    bundle = tmp_path / "run" / "bundle"
    assert _space_of(bundle) == "clip-vit-tiny" and (bundle / ENCODER_FOLDER / "config.json").is_file()
    recorded = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert recorded["ood_encoder"] == str(space)
