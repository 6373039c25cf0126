"""The model card (README.md of a bundle): Hub metadata the Hub's own parser reads back, and what a user must know."""
from __future__ import annotations

import json
import shutil

import pytest

from vqa.errors import DataError


def _results(card) -> dict[tuple[str, str, str], float]:
    return {(r.dataset_split, r.dataset_config, r.metric_name): r.metric_value for r in card.data.eval_results}


def test_train_writes_a_card_the_hub_parses(trained_bundle):
    from huggingface_hub import ModelCard

    card = ModelCard.load(trained_bundle / "README.md")
    data = card.data
    assert data.library_name == "medvqa" and data.license == "mit" and data.pipeline_tag == "visual-question-answering"
    assert {"medical-vqa", "qcr"} <= set(data.tags) and data.base_model is None  # a registered tower, no hub id
    validation = json.loads((trained_bundle / "metrics.json").read_text())["validation"]
    results = _results(card)
    for key in ("overall", "closed", "open"):
        assert results[("validation", "all", f"{key} accuracy (%)")] == round(100 * validation[key], 2)
    text = card.text
    for section in ("## Intended use", "## Not for clinical use", "## Training data", "## Evaluation",
                    "## Calibration and abstention", "## Limitations", "## How to load"):
        assert section in text
    assert "phantom (synthetic images" in text and "train-only" in text and "never test" in text
    assert "Predictor.from_pretrained(" in text and "medvqa predict --bundle" in text
    assert "wrong at most 30% of the time" in text  # the bundle's abstention target (tests/_bundle.py)
    # where it trained: a bf16 bundle's numbers repeat only on the CPU it trained on
    import torch

    from vqa.training.precision import numerics
    recorded = json.loads((trained_bundle / "config.json").read_text())["training"]["numerics"]
    assert recorded == numerics(torch.device("cpu"), "fp32")
    assert f"- trained in fp32 with torch {torch.__version__} on {recorded['device_name']}" in text
    assert ", 1 thread)" in text and "repeats to the bit only with the threads it trained on" in text
    assert "bf16 on a CPU repeats" not in text  # the bf16 caveat is for bf16 runs


def test_the_card_says_where_each_member_trained_and_on_what_its_runs_repeat():
    from vqa.model_card import _numerics_lines

    amx = {"precision": "bf16", "torch": "2.14.1", "device": "cpu", "device_name": "Xeon A", "cpu_capability": "AVX512",
           "avx512_bf16": True, "amx": True, "onednn_max_cpu_isa": None}
    capped = {**amx, "onednn_max_cpu_isa": "AVX512_CORE_BF16"}
    lines = _numerics_lines([amx, amx, capped])
    assert lines[0] == ("- trained in bf16 with torch 2.14.1 on Xeon A (AVX512, AVX512-BF16, AMX), and bf16 with "
                        "torch 2.14.1 on Xeon A (AVX512, AVX512-BF16, AMX, oneDNN capped to AVX512_CORE_BF16)")
    assert lines[1].startswith("- bf16 on a CPU repeats to the bit only on the CPU it trained on")
    threaded = _numerics_lines([{**amx, "precision": "fp32", "threads": 2}, {**amx, "threads": 1}])
    assert threaded[0] == ("- trained in fp32 with torch 2.14.1 on Xeon A (AVX512, AVX512-BF16, AMX, 2 threads), and "
                           "bf16 with torch 2.14.1 on Xeon A (AVX512, AVX512-BF16, AMX, 1 thread)")
    assert threaded[1].startswith("- on a CPU a run repeats to the bit only with the threads it trained on")
    assert threaded[2].startswith("- bf16 on a CPU repeats to the bit only on the CPU it trained on")
    gpu = {"precision": "bf16", "torch": "2.14.1", "device": "cuda", "device_name": "NVIDIA H100", "cuda": "13.0"}
    assert _numerics_lines([gpu]) == ["- trained in bf16 with torch 2.14.1 on NVIDIA H100"]
    assert _numerics_lines([]) == []  # a bundle made before medvqa recorded it


def test_the_card_carries_test_metrics_with_their_protocol_and_the_base_model(trained_bundle, predictor_phantom,
                                                                            tmp_path):
    from huggingface_hub import ModelCard

    from vqa.evaluate import evaluate
    from vqa.io import atomic_write_json
    from vqa.model_card import write_model_card

    bundle = shutil.copytree(trained_bundle, tmp_path / "bundle")
    encoder = json.loads((bundle / "encoder" / "config.json").read_text())
    encoder["config"]["hub_id"] = "openai/clip-vit-base-patch32"  # as a tower built from the Hub records it
    (bundle / "encoder" / "config.json").write_text(json.dumps(encoder))
    report = evaluate(bundle, "vqa-rad", str(predictor_phantom / "vqa-rad"), "test", device="cpu", progress=False)[0]
    atomic_write_json(bundle / "eval-vqa-rad-test" / "metrics.json", report)  # where `medvqa eval` writes it
    card = ModelCard.load(write_model_card(bundle, repo_id="test-org/qcr"))
    assert card.data.base_model == "openai/clip-vit-base-patch32" and card.data.model_name == "test-org/qcr"
    results = _results(card)
    for subset, metrics in report["subsets"].items():
        assert results[("test", subset, "overall accuracy (%)")] == round(100 * metrics["overall"], 2)
    assert ("validation", "all", "overall accuracy (%)") in results
    assert "| vqa-rad test / all |" in card.text and "coverage" in card.text  # test abstention, from the report


def test_a_report_that_is_not_one_is_refused(trained_bundle, tmp_path):
    from vqa.model_card import write_model_card

    bundle = shutil.copytree(trained_bundle, tmp_path / "bundle")
    (tmp_path / "other.json").write_text('{"accuracy": 1}')
    with pytest.raises(DataError, match="other.json: not a `medvqa eval` report"):
        write_model_card(bundle, eval_reports=[tmp_path / "other.json"])


def test_a_report_of_another_model_is_refused(trained_bundle, predictor_phantom, tmp_path):
    from vqa.bundle import model_digest
    from vqa.evaluate import evaluate
    from vqa.io import atomic_write_json
    from vqa.model_card import write_model_card

    from ._bundle import feature_cache_copy

    bundle = shutil.copytree(trained_bundle, tmp_path / "bundle")
    report = evaluate(bundle, "vqa-rad", str(predictor_phantom / "vqa-rad"), device="cpu", progress=False,
                      cache_dir=str(feature_cache_copy(trained_bundle, tmp_path / "cache")))[0]
    assert report["model_digest"] == model_digest(trained_bundle)
    atomic_write_json(tmp_path / "ours" / "metrics.json", report)
    write_model_card(bundle, eval_reports=[tmp_path / "ours"])  # calibration and card are not the model: same digest
    atomic_write_json(tmp_path / "theirs" / "metrics.json", report | {"model_digest": "0" * 16})
    with pytest.raises(DataError, match="theirs/metrics.json: this report scored another model"):
        write_model_card(bundle, eval_reports=[tmp_path / "theirs"])
    retrained = bundle / "model.safetensors"
    retrained.write_bytes(retrained.read_bytes() + b" ")  # any other weights
    with pytest.raises(DataError, match="ours/metrics.json: this report scored another model"):
        write_model_card(bundle, eval_reports=[tmp_path / "ours"])


def test_a_card_that_cannot_be_written_costs_a_warning_not_the_bundle(trained_bundle, tmp_path, caplog):
    import logging

    from vqa.model_card import write_card

    bundle = shutil.copytree(trained_bundle, tmp_path / "bundle")
    (bundle / "README.md").unlink()
    (bundle / "eval-vqa-rad-test").mkdir()
    (bundle / "eval-vqa-rad-test" / "metrics.json").write_text("{not json")  # a report the card cannot read
    with caplog.at_level(logging.WARNING, logger="vqa.model_card"):
        write_card(bundle)
    assert "no model card written" in caplog.text and not (bundle / "README.md").exists()
    assert (bundle / "model.safetensors").exists()


def test_training_data_is_named_without_local_paths(predictor_phantom, tmp_path):
    from vqa.model_card import dataset_label, training_data

    phantom = training_data("vqa-rad", str(predictor_phantom / "vqa-rad"))
    assert phantom["source"] == "phantom" and "phantom" in dataset_label(phantom)
    hub = training_data("hf", "flaviagiammarino/vqa-rad")
    assert hub["hub_id"] == "flaviagiammarino/vqa-rad"
    assert dataset_label(hub) == "a 🤗 datasets copy (flaviagiammarino/vqa-rad)"
    local = training_data("slake", str(tmp_path / "home" / "me" / "Slake1.0"))
    assert local == {"format": "slake", "source": "local", "hub_id": None, "folder": "Slake1.0", "split": "train",
                     "lang": "en"}


def test_a_card_written_again_keeps_the_license_it_was_given(trained_bundle, tmp_path):
    """`push --license cc-by-sa-4.0` (SLAKE-derived weights), then a push or calibrate without it: still cc-by-sa."""
    from huggingface_hub import ModelCard

    from vqa.model_card import write_model_card

    bundle = shutil.copytree(trained_bundle, tmp_path / "bundle")
    write_model_card(bundle, license_id="cc-by-sa-4.0")
    write_model_card(bundle)
    assert ModelCard.load(bundle / "README.md").data.license == "cc-by-sa-4.0"
    write_model_card(bundle, license_id="apache-2.0")
    assert ModelCard.load(bundle / "README.md").data.license == "apache-2.0"
