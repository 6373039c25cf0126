"""`medvqa classify`: linear probe, fine-tuning (engine) and CLIP zero-shot on the phantom's classification
exports, read by the MedMNIST and ImageFolder loaders a user's files go through."""
from __future__ import annotations

import json

import pytest
import torch

from pretrain.classify import ClassifyConfig, classify, class_texts, load_prompt_file, prompt_entry
from vqa.cli.classify import main
from vqa.errors import DataError


def _npz(phantom, flag: str) -> str:
    return str(phantom / "classification" / "medmnist" / f"{flag}_64.npz")


def _cfg(phantom, tmp_path, flag: str, **kw) -> ClassifyConfig:
    base = dict(data=_npz(phantom, flag), out=str(tmp_path / kw.get("method", "probe")),
                cache_dir=str(tmp_path / "cache"), progress=False, device="cpu")
    return ClassifyConfig(**{**base, **kw})


@pytest.mark.parametrize("flag", ["phantommodalitymnist", "phantomorganmnist"])
def test_probe_and_zero_shot_beat_the_majority_class(phantom_clip, tmp_path, flag):
    phantom, run = phantom_clip
    probe = classify(_cfg(phantom, tmp_path, flag, encoder=str(run / "encoder")))
    zero = classify(_cfg(phantom, tmp_path, flag, method="zero-shot", clip=str(run / "clip")))
    majority = probe["majority"]["test"]
    # measured on the 48 test images: modality probe 97.9 / zero-shot 91.7, organ 97.9 / 79.2 (majority 37.5 / 41.7)
    assert probe["test"]["accuracy"] >= majority + 0.4, (probe["test"], majority)
    assert zero["test"]["accuracy"] >= majority + 0.25, (zero["test"], majority)
    assert probe["test"]["auc"] > 0.9 and zero["test"]["auc"] > 0.85
    assert probe["selection"]["C"] in [s["C"] for s in probe["selection"]["sweep"]]
    assert zero["model"]["prompt_set"] == flag  # the phantom's caption-style prompts, picked by the set's name
    # the probe and zero-shot read the same feature cache: the image tower's fingerprint is the same
    assert len(list((tmp_path / "cache").iterdir())) == 1
    written = json.loads((tmp_path / "zero-shot" / "metrics.json").read_text())
    assert written["test"] == zero["test"] and "majority" in (tmp_path / "zero-shot" / "report.md").read_text()


def test_probe_through_the_cli_on_an_image_folder(phantom_dir, tmp_path, capsys):
    root = phantom_dir / "classification" / "imagefolder" / "modality"
    out = tmp_path / "cli"
    assert main(["--format", "imagefolder", "--data", str(root), "--encoder", "clip-vit-tiny", "--features", "grid",
                 "--select", "accuracy", "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
                 "--threads", "1", "--no-progress"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["dataset"]["labels"] == ["ct", "mri", "x-ray"] and report["model"]["features"] == "grid"
    assert report["dataset"]["n"] == {"train": 42, "val": 6, "test": 12}
    assert 0 <= report["test"]["accuracy"] <= 1 and "| test | 12 |" in capsys.readouterr().out
    assert json.loads((out / "run_config.json").read_text())["method"] == "probe"


def test_finetune_with_grad_checkpointing_learns_the_same_head(phantom_dir, tmp_path, caplog):
    from safetensors.torch import load_file

    kw = dict(method="finetune", encoder="vit-tiny", epochs=1, batch_size=16, lr=3e-3, select="accuracy")
    plain = classify(_cfg(phantom_dir, tmp_path / "plain", "phantomfindingsmnist", **kw))
    with caplog.at_level("INFO", logger="vqa.training.engine"):
        checkpointed = classify(_cfg(phantom_dir, tmp_path / "ckpt", "phantomfindingsmnist", grad_checkpointing=True,
                                     **kw))
    assert "gradient checkpointing: vit-tiny recompute" in caplog.text
    assert checkpointed["val"] == pytest.approx(plain["val"])
    heads = [load_file(str(tmp_path / run / "finetune" / "head.safetensors")) for run in ("plain", "ckpt")]
    for key, value in heads[0].items():
        torch.testing.assert_close(heads[1][key], value, rtol=1e-4, atol=1e-6, msg=key)


def test_finetune_runs_on_the_engine_and_keeps_the_best_val_epoch(phantom_dir, tmp_path):
    cfg = _cfg(phantom_dir, tmp_path, "phantomfindingsmnist", method="finetune", encoder="resnet-tiny", epochs=2,
               batch_size=16, lr=3e-3, augment=True, select="accuracy")
    report = classify(cfg)
    out = tmp_path / "finetune"
    assert report["dataset"]["task"] == "multi-label, binary-class" and 0 <= report["test"]["accuracy"] <= 1
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 2
    best = max(history, key=lambda row: row["val_score"])  # the first of equals, as the engine keeps it
    assert report["selection"]["epoch"] == best["epoch"]
    assert report["val"]["accuracy"] == pytest.approx(best["val_accuracy"])
    from encoders import create_encoder
    from safetensors.torch import load_file

    encoder = create_encoder(out / "encoder")
    head = load_file(str(out / "head.safetensors"))
    assert head["weight"].shape == (4, encoder.feature_dim)
    assert json.loads((out / "labels.json").read_text())["labels"] == list(report["dataset"]["labels"])
    assert (out / "checkpoint.pt").is_file()


def test_zero_shot_plumbing_with_an_untrained_clip(phantom_dir, tmp_path):
    """Fast lane: prompts, the multi-label rule and outputs, on an untrained CLIP (its scores are near chance)."""
    from pretrain import PretrainConfig, pretrain

    pretrain(PretrainConfig(data=str(phantom_dir / "captions"), epochs=0, embed_dim=16, out=str(tmp_path / "p"),
                            progress=False, val_split="none"))
    for flag in ("phantomabnormalmnist", "phantomfindingsmnist"):
        report = classify(_cfg(phantom_dir, tmp_path, flag, method="zero-shot", clip=str(tmp_path / "p" / "clip")))
        assert 0 <= report["test"]["accuracy"] <= 1 and report["val"]["n"] == 6
    examples = report["model"]["prompt_examples"]
    assert examples["mass"][0] == "CT image showing a mass." and report["dataset"]["task"].startswith("multi-label")


def test_prompt_entries():
    from vqa.data.classification import ClassificationSet

    prompts = load_prompt_file()  # an entry is picked by the dataset's name

    def named(name, labels):
        return ClassificationSet([], torch.zeros(0).numpy(), labels, "multi-class", "test", name, "")

    key, entry = prompt_entry(prompts, named("pathmnist", ("adipose", "debris")))
    assert key == "pathmnist" and class_texts(entry, "debris")[0] == "a histopathology image showing debris."
    key, entry = prompt_entry(prompts, named("modality", ("ct", "mri", "x-ray")))  # an ImageFolder of the phantom
    assert key == "phantommodalitymnist" and "X-ray image." in class_texts(entry, "x-ray")
    key, _ = prompt_entry(prompts, named("modality", ("ct", "ultrasound")))  # not the phantom's classes
    assert key == "default"
    with pytest.raises(DataError, match="names no prompts for the classes"):
        prompt_entry(prompts, named("x", ("ct", "pet")), prompt_set="phantommodalitymnist")


def test_format_choices_are_the_registry():
    from vqa.cli.classify import CLASSIFY_FORMATS
    from vqa.data.classification import CLASSIFICATION_FORMATS

    assert CLASSIFY_FORMATS == tuple(CLASSIFICATION_FORMATS)


def test_bad_configs_are_errors():
    with pytest.raises(DataError, match="needs --clip"):
        classify(ClassifyConfig(method="zero-shot"))
    with pytest.raises(DataError, match="--method 'knn'"):
        classify(ClassifyConfig(method="knn"))


def test_zero_shot_with_an_open_clip_source(phantom_dir, tmp_path):
    """A released-format CLIP (open_clip's local-dir: layout, a tiny replica): its own text tower embeds the prompts."""
    pytest.importorskip("open_clip")
    from pretrain.zero_shot_choice import evaluate_zero_shot_choice

    from ._released import VIT, open_clip_model, save_local_dir

    folder = save_local_dir(open_clip_model(VIT), VIT, tmp_path / "oc")
    report = classify(_cfg(phantom_dir, tmp_path, "phantomorganmnist", method="zero-shot",
                           clip=f"local-dir:{folder}"))
    assert 0 <= report["test"]["accuracy"] <= 1 and 0 < report["model"]["logit_scale"] <= 100
    choice, _, _ = evaluate_zero_shot_choice(f"local-dir:{folder}", "pmc-vqa", str(phantom_dir / "pmc-vqa"),
                                             cache_dir=str(tmp_path / "cache"), progress=False, device="cpu")
    assert choice["subsets"]["all"]["n"] == 24 and choice["subsets"]["all"]["chance"] == pytest.approx(0.25)
