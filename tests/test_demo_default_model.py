"""The embedded default model: built by its recipe's steps, cached by recipe hash, written atomically."""
from __future__ import annotations

import dataclasses
import json

import pytest

from demos import default_model
from demos.default_model import DefaultModelRecipe, ensure_default_bundle

TINY = DefaultModelRecipe(phantom_images=20, encoder_mode="frozen", epochs=1, embed_dim=16, question_dim=32,
                          head_args={"hidden_dim": 32, "glimpses": 1, "type_hidden": [16]})


def _boom(*_):
    raise RuntimeError("step must not run")


def test_build_once_then_cached(tmp_path, monkeypatch):
    bundle = ensure_default_bundle(progress=False, recipe=TINY, root=tmp_path)
    assert bundle == tmp_path / f"default-{TINY.key()}" / "bundle"
    assert (bundle / "config.json").is_file() and (bundle / "model.safetensors").is_file()
    summary = json.loads((bundle.parent / "recipe.json").read_text())
    assert summary["key"] == TINY.key() and summary["recipe"]["phantom_images"] == 20
    assert summary["steps"] == ["phantom data", "train"]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [bundle.parent.name]

    monkeypatch.setattr(default_model, "STEPS", [("fail", _boom)])
    assert ensure_default_bundle(progress=False, recipe=TINY, root=tmp_path) == bundle  # cached: no step runs

    from vqa import Predictor

    from PIL import Image

    p = Predictor.from_bundle(bundle).predict(Image.new("L", (128, 128), 90), "Is there a lesion?")
    assert p.answer in ("yes", "no")


def test_recipe_key_follows_every_field():
    """A cached default model is reused by its key: any field the key missed would serve a stale model."""
    base = DefaultModelRecipe()
    assert len(base.key()) == 12 and base.key() == DefaultModelRecipe().key()
    other = {int: lambda v: v + 1, float: lambda v: v * 2, str: lambda v: v + "-other",
             dict: lambda v: {**v, "changed": 1}}
    for f in dataclasses.fields(DefaultModelRecipe):
        value = getattr(base, f.name)
        changed = dataclasses.replace(base, **{f.name: other[type(value)](value)})
        assert changed.key() != base.key(), f.name


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(default_model, "STEPS", [("fail", _boom)])
    with pytest.raises(RuntimeError, match="must not run"):
        ensure_default_bundle(progress=False, recipe=TINY, root=tmp_path)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_examples_cover_modalities_and_regions(tmp_path):
    from demos.examples import ensure_examples

    examples = ensure_examples(n=6, root=tmp_path)
    assert len(examples) == 6 and all(e.path.is_file() for e in examples)
    pairs = {tuple(e.caption.split(" · ")[:2]) for e in examples}
    assert len(pairs) == 6  # six distinct (modality, region) pairs before any repeat
    assert ensure_examples(n=6, root=tmp_path) == examples  # cached
