"""ONNX export and the onnxruntime runtime: the same answers as PyTorch, scores within 1e-4, for every head kind."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from ._bundle import ground_truth
from vqa.cli import main
from vqa.errors import DataError

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

GRAPH_TOLERANCE = 1e-4  # on scores, given the same image features: the graphs themselves agree within 1e-6
# End to end, each runtime computes the features, stored in float16 as the feature cache stores them: the
# encoders' float32 differences (<= 5e-6) flip ~0.3 % of the features by one float16 step, which moves a
# score by up to 1.2e-4 (1 of the test bundle's 384 test questions above 1e-4; p99 1.8e-5, median 1e-7).
TOLERANCE = 5e-4


def assert_same(reference, onnx) -> float:
    """Same answers, types, abstentions and ranked answers; returns the largest |score difference|."""
    worst = 0.0
    for a, b in zip(reference, onnx, strict=True):
        assert (b.answer, b.question_type, b.abstained, b.abstain_reason is None) == \
               (a.answer, a.question_type, a.abstained, a.abstain_reason is None), a.question
        assert [x for x, _ in b.top_k] == [x for x, _ in a.top_k]
        diffs = [abs(s - t) for (_, s), (_, t) in zip(a.top_k, b.top_k)]
        diffs += [abs(a.confidence - b.confidence), float(np.abs(a.attention_grid - b.attention_grid).max())]
        if a.question_type_score is not None:
            diffs.append(abs(a.question_type_score - b.question_type_score))
        worst = max(worst, *diffs)
    assert worst <= TOLERANCE
    return worst


def assert_same_head(reference, onnx, images, questions, choices=None) -> float:
    """Both runtimes' heads on the same (PyTorch) features through `vqa.inference.predict`: same answers and
    router types, scores within GRAPH_TOLERANCE; returns the largest |score difference|."""
    from vqa.batches import encode_queries, unique_images
    from vqa.inference import answer_scores, predict
    from vqa.predictor import read_image

    distinct, rows = unique_images(images)
    table = reference.runtime.encode([read_image(i).image for i in distinct], 16)
    queries = encode_queries(questions, rows, reference.tokenizer, reference.max_len, choices, reference.choice_len)
    preds = [predict(p.runtime.head, queries, table, p.answers, p.device, batch_size=16, choices=choices)
             for p in (reference, onnx)]
    assert preds[1].answers == preds[0].answers and preds[1].types == preds[0].types
    n = None if choices is None else [len(c) for c in choices]
    a, b = (answer_scores(x.logits, reference.score_kind, n) for x in preds)
    worst = float(max((a - b).abs().max(), (preds[0].attention - preds[1].attention).abs().max()))
    assert (preds[0].fused is None) == (preds[1].fused is None)  # what trust scores need travels with the graph
    if preds[0].fused is not None:
        worst = max(worst, float((preds[0].fused - preds[1].fused).abs().max()))
    assert worst <= GRAPH_TOLERANCE
    return worst


@pytest.fixture(scope="module")
def exported(trained_bundle, tmp_path_factory):
    from vqa.onnx_export import export_onnx

    report = export_onnx(trained_bundle, tmp_path_factory.mktemp("onnx") / "qcr")
    # QCR's router is in the graph, and the fused vector the calibration's trust scores read
    assert report.head_outputs == ["logits", "attention", "type_logits", "fused"]
    assert max(report.max_abs_diff.values()) < 1e-4, report.max_abs_diff
    assert (trained_bundle / "README.md").is_file() and not (report.folder / "README.md").exists()  # names the bundle
    return report.folder


def test_qcr_export_answers_as_pytorch(predictor, exported, predictor_phantom):
    from vqa import Predictor

    rows = ground_truth(predictor_phantom)[:40]
    images, questions = [r["image"] for r in rows], [r["question"] for r in rows]
    onnx = Predictor.from_onnx(exported)
    assert onnx.describe()["runtime"] == "onnx" and onnx.score_kind == predictor.score_kind == "sigmoid"
    # batches of 16 and a remainder of 8: the graphs' batch axis is dynamic
    assert_same(predictor.predict_batch(images, questions, batch_size=16),
                onnx.predict_batch(images, questions, batch_size=16))
    assert_same_head(predictor, onnx, images, questions)
    assert all(p.question_type_source == "router" for p in onnx.predict_batch(images[:3], questions[:3]))


def _train_tiny(phantom, out, **kw):
    from vqa.train import TrainConfig, train

    return train(TrainConfig(encoder="clip-vit-tiny", embed_dim=16, question_dim=32, epochs=1, device="cpu",
                             out=str(out), cache_dir=str(out / "features"), progress=False, **kw))


def test_mevfs_image_side_exports_with_its_antialiased_resize(tmp_path):
    """MEVF's MAML branch resizes 128 -> 84 px with antialiasing, which ONNX (opset 17) has no operator for: the
    export writes the same weights as matrix products (encoders/mevf.py)."""
    import torch

    from encoders import create_encoder
    from vqa.onnx_export import OPSET, _EncoderGraph, _export
    from vqa.onnx_runtime import session

    torch.manual_seed(0)
    encoder = create_encoder("mevf").eval()
    pixels = torch.rand(3, 1, 128, 128)
    axes = {n: {0: "batch"} for n in ("pixels", "grid", "pooled")}
    _export(_EncoderGraph(encoder).eval(), (pixels[:2],), tmp_path / "mevf.onnx", ["pixels"], ["grid", "pooled"], axes,
            OPSET, "image encoder")
    got = session(tmp_path / "mevf.onnx").run(["pooled"], {"pixels": pixels.numpy()})[0]
    with torch.no_grad():
        expected = encoder(pixels)["pooled"]
    assert float((torch.from_numpy(got) - expected).abs().max()) < 1e-4


@pytest.mark.parametrize("head, head_args", [("mevf-ban", {"hidden_dim": 32, "glimpses": 2}),
                                             ("mevf-san", {"hidden_dim": 32, "hops": 2})])
def test_mevf_heads_export_answers_as_pytorch(predictor_phantom, tmp_path, head, head_args):
    from vqa import Predictor
    from vqa.onnx_export import export_onnx

    bundle = _train_tiny(predictor_phantom, tmp_path, data=str(predictor_phantom / "vqa-rad"), head=head,
                         head_args=head_args)
    export_onnx(bundle, bundle / "onnx")
    rows = ground_truth(predictor_phantom)[:24]
    images, questions = [r["image"] for r in rows], [r["question"] for r in rows]
    torch_side = Predictor.from_bundle(bundle)
    onnx = Predictor.from_pretrained(bundle, runtime="onnx")  # finds the bundle's onnx/ folder
    assert onnx.has_router is False
    assert_same(torch_side.predict_batch(images, questions), onnx.predict_batch(images, questions))
    assert_same_head(torch_side, onnx, images, questions)


@pytest.mark.slow  # a run with a text tower, exported and asked twice: the fast lane has the other heads'
def test_the_transformer_head_on_a_text_tower_exports_answers_as_pytorch(predictor_phantom, tmp_path):
    """The VQA-RAD recipe's shape (README): the cross-modal transformer with QCR's router over a pretrained-style
    text tower, whose subword tokenizer the ONNX folder carries (the export holds no word vocabulary)."""
    from vqa import Predictor
    from vqa.onnx_export import export_onnx

    bundle = _train_tiny(predictor_phantom, tmp_path, data=str(predictor_phantom / "vqa-rad"),
                         head="fusion-transformer-qcr", head_args={"hidden_dim": 32, "layers": 1, "attention_heads": 2},
                         question_encoder="bert-tiny", question_lr=1e-3)
    report = export_onnx(bundle, tmp_path / "onnx")
    assert report.head_inputs == ["grid", "tokens", "lengths"] and "type_logits" in report.head_outputs
    assert (tmp_path / "onnx" / "tokenizer").is_dir() and not (tmp_path / "onnx" / "vocab.json").exists()
    rows = ground_truth(predictor_phantom)[:24]
    images, questions = [r["image"] for r in rows], [r["question"] for r in rows]
    torch_side, onnx = Predictor.from_bundle(bundle), Predictor.from_onnx(tmp_path / "onnx")
    assert onnx.has_router is True
    assert_same(torch_side.predict_batch(images, questions), onnx.predict_batch(images, questions))
    assert_same_head(torch_side, onnx, images, questions)


@pytest.mark.slow  # a run with a text tower, exported and asked at three batch sizes
def test_an_eos_pooled_text_tower_exports_for_any_batch_size(predictor_phantom, tmp_path):
    """A CLIP-style tower pools its EOS token, found from the lengths: the exported graph must index the batch
    it is given, not the one it was traced with (2); SAN reads that pooled vector."""
    from vqa import Predictor
    from vqa.onnx_export import export_onnx

    bundle = _train_tiny(predictor_phantom, tmp_path, data=str(predictor_phantom / "vqa-rad"), head="mevf-san",
                         head_args={"hidden_dim": 32, "hops": 1}, question_encoder="clip-text-tiny", question_lr=1e-3)
    export_onnx(bundle, tmp_path / "onnx")
    rows = ground_truth(predictor_phantom)[:3]
    torch_side, onnx = Predictor.from_bundle(bundle), Predictor.from_onnx(tmp_path / "onnx")
    for n in (1, 3):
        images, questions = [r["image"] for r in rows[:n]], [r["question"] for r in rows[:n]]
        assert_same(torch_side.predict_batch(images, questions), onnx.predict_batch(images, questions))


def test_multiple_choice_export_answers_as_pytorch(predictor_phantom, tmp_path):
    from vqa import Predictor
    from vqa.data import load_records
    from vqa.onnx_export import export_onnx

    bundle = _train_tiny(predictor_phantom, tmp_path, format="pmc-vqa", data=str(predictor_phantom / "pmc-vqa"),
                         head="mc-ban", head_args={"hidden_dim": 32, "glimpses": 1})
    export_onnx(bundle, tmp_path / "mc-onnx")
    records = load_records("pmc-vqa", predictor_phantom / "pmc-vqa", "test")[:20]
    choices = [list(r.choices[: 2 + i % 3]) for i, r in enumerate(records)]  # 2-4 choices: padded, masked
    args = ([r.image for r in records], [r.question for r in records])
    torch_side, onnx_side = Predictor.from_bundle(bundle), Predictor.from_onnx(tmp_path / "mc-onnx")
    onnx = onnx_side.predict_batch(*args, choices=choices)
    assert_same(torch_side.predict_batch(*args, choices=choices), onnx)
    assert_same_head(torch_side, onnx_side, *args, choices=choices)
    assert all(p.score_kind == "softmax" and p.answer in c for p, c in zip(onnx, choices))


def test_cli_export_into_the_bundle_then_predict_with_onnx(trained_bundle, predictor, predictor_phantom, tmp_path,
                                                          capsys):
    bundle = tmp_path / "bundle"
    shutil.copytree(trained_bundle, bundle)
    row = ground_truth(predictor_phantom)[5]
    ask = ["predict", "--bundle", str(bundle), "--image", str(row["image"]), "--question", row["question"],
           "--threads", "1"]
    assert main([*ask, "--runtime", "onnx"]) == 2
    assert "no ONNX export here" in capsys.readouterr().err
    assert main(["export", "onnx", str(bundle), "--threads", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["out"] == str(bundle / "onnx") and max(report["max_abs_diff_vs_torch"].values()) < 1e-4
    assert main(["export", "onnx", str(bundle)]) == 2  # exists: needs --overwrite
    assert "already exists" in capsys.readouterr().err
    assert main(["export", "onnx", str(bundle), str(tmp_path), "--overwrite"]) == 2  # would delete the bundle
    assert "would replace the bundle" in capsys.readouterr().err and (bundle / "model.safetensors").is_file()
    assert main([*ask, "--runtime", "onnx"]) == 0
    out = json.loads(capsys.readouterr().out)
    reference = predictor.predict(row["image"], row["question"])
    assert out["answer"] == reference.answer and out["score"] == pytest.approx(reference.score, abs=TOLERANCE)


@pytest.mark.slow  # an export, an eval, a calibration
def test_calibrating_again_exports_again(trained_bundle, predictor_phantom, tmp_path, capsys):
    """`medvqa calibrate` replaces the calibration that an export and an eval report carry: the export is made
    again (else the onnx runtime would abstain by the old one), and the card stops quoting the old report."""
    from vqa import Predictor
    from vqa.model_card import write_card

    from ._bundle import feature_cache_copy

    bundle = shutil.copytree(trained_bundle, tmp_path / "bundle")
    data, cache = str(predictor_phantom / "vqa-rad"), str(feature_cache_copy(trained_bundle, tmp_path / "cache"))
    assert main(["export", "onnx", str(bundle), "--threads", "1"]) == 0
    assert main(["eval", "--bundle", str(bundle), "--format", "vqa-rad", "--data", data, "--cache-dir", cache,
                 "--device", "cpu", "--no-progress"]) == 0
    write_card(bundle)  # as `medvqa push` writes it: the eval report's abstention quoted
    assert "at target risk" in (bundle / "README.md").read_text()
    capsys.readouterr()
    assert main(["calibrate", str(bundle), "--format", "vqa-rad", "--data", data, "--cache-dir", cache,
                 "--device", "cpu", "--no-progress", "--target-risk", "0.05"]) == 0
    assert (bundle / "onnx" / "calibration.json").read_text() == (bundle / "calibration.json").read_text()
    assert "at target risk" not in (bundle / "README.md").read_text()  # the report measured the old one
    rows = ground_truth(predictor_phantom)[:24]
    images, questions = [r["image"] for r in rows], [r["question"] for r in rows]
    assert_same(Predictor.from_bundle(bundle).predict_batch(images, questions),
                Predictor.from_pretrained(bundle, runtime="onnx").predict_batch(images, questions))
    # calibrated twice: both described alike ("... (medvqa calibrate)"), yet the report measured the first one only
    assert main(["eval", "--bundle", str(bundle), "--format", "vqa-rad", "--data", data, "--cache-dir", cache,
                 "--device", "cpu", "--no-progress"]) == 0
    write_card(bundle)
    assert "at target risk 5%" in (bundle / "README.md").read_text()
    assert main(["calibrate", str(bundle), "--format", "vqa-rad", "--data", data, "--cache-dir", cache,
                 "--device", "cpu", "--no-progress", "--target-risk", "0.2"]) == 0
    assert "at target risk" not in (bundle / "README.md").read_text()


def test_onnx_runtime_refuses_a_gpu_and_a_bundle_folder(trained_bundle):
    from vqa import Predictor

    with pytest.raises(DataError, match="runs on the CPU"):
        Predictor.from_pretrained(trained_bundle, runtime="onnx", device="cuda")
    with pytest.raises(DataError, match="not an ONNX export"):
        Predictor.from_onnx(trained_bundle)
    with pytest.raises(DataError, match="expected one of torch, onnx"):
        Predictor.from_pretrained(trained_bundle, runtime="tensorrt")
