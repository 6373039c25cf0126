"""Linear probes of frozen image features on the phantom's ground truth: what a VQA head could read.

    medvqa probe --encoder runs/pretrain/encoder --phantom runs/phantom
    medvqa probe --encoder vit-tiny --encoder-arg image_size=128 --phantom runs/phantom  # untrained

For each field of `phantom.jsonl`'s scene (modality, plane, region, abnormal,
count, lesion kind/size/side/organ), a logistic regression on standardised
features (ridge, penalty by leave-one-out CV) is fitted on the train+validate images and scored on the test images.
Features: "pooled" (B, D) and "grid" (the (B, N, D) grid flattened, which keeps
where things are, as the heads' attention does). Absent lesion fields are the
class "none", so e.g. lesion_side has classes left/right/none.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from encoders import ImageTable, normalize
from vqa.errors import DataError
from vqa.io import read_jsonl

log = logging.getLogger(__name__)
FIELDS = ("modality", "plane", "region", "abnormal", "count", "lesion_kind", "lesion_size", "lesion_side",
          "lesion_organ")


@torch.no_grad()
def frozen_features(encoder, images: Sequence, batch_size: int = 64) -> dict[str, np.ndarray]:
    """{"pooled": (N, D), "grid": (N, G*D)} float32 features of a frozen encoder (CPU)."""
    encoder.eval()
    table = ImageTable(images, encoder.image_size, encoder.in_chans, progress=False)
    pooled, grid = [], []
    for start in range(0, len(table), batch_size):
        out = encoder(normalize(table.pixels[start:start + batch_size], encoder, torch.device("cpu")))
        pooled.append(out["pooled"].float().numpy())
        grid.append(out["grid"].float().flatten(1).numpy())
    return {"pooled": np.concatenate(pooled), "grid": np.concatenate(grid)}


def _labels(rows: list[dict], field: str) -> list[str]:
    return [str(r["scene"].get(field)).lower() if r["scene"].get(field) is not None else "none" for r in rows]


def linear_probe(encoder, phantom: str | Path, fields: Sequence[str] = FIELDS) -> dict:
    """Test accuracy (%) per feature kind and field, with the majority-class baseline."""
    from sklearn.linear_model import RidgeClassifierCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    root = Path(phantom)
    rows = read_jsonl(root / "phantom.jsonl")
    images = root / "captions" / "images"
    if not images.is_dir():
        raise DataError(f"{root}: no captions/images folder; pass a folder written by `medvqa phantom`")
    train = [r for r in rows if r["split"] != "test"]
    test = [r for r in rows if r["split"] == "test"]
    feats = frozen_features(encoder, [images / r["file"] for r in rows])
    is_test = np.array([r["split"] == "test" for r in rows])
    results: dict = {"majority": {}, "n_train": len(train), "n_test": len(test)}
    for kind, x in feats.items():
        results[kind] = {}
        for field in fields:
            y_train, y_test = _labels(train, field), _labels(test, field)
            if len(set(y_train)) < 2:
                continue
            # ridge with its penalty chosen by efficient leave-one-out CV on the training images
            clf = make_pipeline(StandardScaler(), RidgeClassifierCV(alphas=np.logspace(-1, 5, 13)))
            clf.fit(x[~is_test], y_train)
            results[kind][field] = 100.0 * float(np.mean(clf.predict(x[is_test]) == np.array(y_test)))
            results["majority"][field] = 100.0 * max(y_test.count(v) for v in set(y_test)) / len(y_test)
    return results


def table(results: dict[str, dict]) -> str:
    """Markdown: one row per field, one column per (encoder, feature kind)."""
    cols = [(name, kind) for name, r in results.items() for kind in ("pooled", "grid")]
    first = next(iter(results.values()))
    lines = ["| field | majority | " + " | ".join(f"{n} {k}" for n, k in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for field in first["majority"]:
        vals = " | ".join(f"{results[n][k].get(field, float('nan')):.1f}" for n, k in cols)
        lines.append(f"| {field} | {first['majority'][field]:.1f} | {vals} |")
    return "\n".join(lines)
