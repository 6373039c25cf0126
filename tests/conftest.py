"""Shared fixtures: a small phantom dataset generated once per test session."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Never reach for a hub from tests: fail fast and offline.
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """60 phantom images in every format (seed 0)."""
    from vqa.phantom import generate_phantom

    out = tmp_path_factory.mktemp("phantom") / "p"
    generate_phantom(out, n_images=60, seed=0, workers=0)
    return out


@pytest.fixture(scope="session")
def phantom_truth(phantom_dir) -> list[dict]:
    """The generator's ground truth, one dict per image."""
    with open(phantom_dir / "phantom.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def shared_data(name: str) -> Path:
    """A folder of ../shared/data, or skip the test when it is absent (CI without real data)."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real data not available: {path}")
    return path
