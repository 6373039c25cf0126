"""The small trained bundle the predictor, CLI and demo tests share, and helpers to query it.

conftest.py builds it once per test run (`built_once`) for the session fixtures `trained_bundle`,
`predictor_phantom` and `predictor`.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

_KNOWN: dict[str, dict] = {}  # known_answer, per question kind
PHANTOM_IMAGES = 240
TARGET_RISK = 0.3  # the bundle is right 60-70 % of the time on validation: an abstention target it can reach
TEST_HEAD_ARGS = {"hidden_dim": 64, "glimpses": 1, "attention_dropout": 0.0, "classifier_dropout": 0.0,
                  "dropout": 0.0, "type_hidden": [32]}


def build_test_bundle(base: Path) -> None:
    """A QCR head on the tiny CLIP tower, trained for seconds: BASE/run/bundle, on the phantom BASE/phantom."""
    from vqa.phantom import generate_phantom
    from vqa.train import TrainConfig, train

    phantom = base / "phantom"
    generate_phantom(phantom, n_images=PHANTOM_IMAGES, seed=3, workers=0)
    cfg = TrainConfig(data=str(phantom / "vqa-rad"), out=str(base / "run"), encoder="clip-vit-tiny",
                      head="qcr", head_args=dict(TEST_HEAD_ARGS), embed_dim=64, question_dim=64, epochs=20,
                      batch_size=32, lr=3e-3, seed=0, device="cpu", cache_dir=str(base / "features"),
                      progress=False, target_risk=TARGET_RISK)
    train(cfg)  # ~20 s on the one thread built_once gives it


def built_bundle(base: Path) -> Path:
    """The bundle `build_test_bundle(base)` wrote."""
    return base / "run" / "bundle"


def feature_cache_copy(bundle: Path, to: Path) -> Path:
    """A copy of the feature cache the bundle at `built_bundle(base)` was trained with: a test reading the phantom's
    images through that encoder computes only the images it adds (the shared cache itself is never written)."""
    import shutil

    return shutil.copytree(bundle.parents[1] / "features", to)


def bundle_phantom(bundle: Path) -> Path:
    """The phantom the bundle at `built_bundle(base)` was trained on."""
    return bundle.parents[1] / "phantom"


def ground_truth(phantom: Path, split: str = "test") -> list[dict]:
    """Every question of `split` with its image path: {"image", "question", "answer", "kind", "answer_type"}."""
    rows = []
    with open(phantom / "phantom.jsonl", encoding="utf-8") as f:
        for line in f:
            item = json.loads(line)
            if item["split"] == split:
                for qa in item["qa"]:
                    rows.append({"image": phantom / "vqa-rad" / "images" / item["file"], **qa})
    return rows


def known_answer(predictor, phantom: Path, kind: str = "modality") -> dict:
    """A held-out question of `kind` that the test bundle answers correctly, and confidently enough not to
    abstain (for the UI tests)."""
    if kind not in _KNOWN:
        rows = [r for r in ground_truth(phantom) if r["kind"] == kind and r["answer_type"] == "OPEN"]
        for row in rows:
            p = predictor.predict(row["image"], row["question"])
            if p.answer == row["answer"] and not p.abstained:
                _KNOWN[kind] = row
                break
        else:
            pytest.fail(f"the test bundle answers none of {len(rows)} held-out {kind} questions correctly")
    return _KNOWN[kind]


