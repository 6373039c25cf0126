"""`medvqa encoders` and `medvqa import openai-clip | pmc-clip | encoder`."""
from __future__ import annotations

import json

import pytest
import torch

from encoders import PREFIXES, create_encoder, list_encoders
from vqa.cli import main as cli


def test_encoders_lists_every_name_and_spelling(capsys):
    assert cli(["encoders"]) == 0
    out = capsys.readouterr().out
    for name in list_encoders():
        assert name in out
    for spelling in PREFIXES:
        assert spelling in out
    row = next(line.split() for line in out.splitlines() if line.startswith("efficientnet-lite0-imagenet "))
    assert row[1:6] == ["timm", "3x224", "7x7", "1280", "package"]
    assert "hf-hub:<org>/<name>" in out and "flaviagiammarino/pubmed-clip-vit-base-patch32" in out


def test_encoders_json_and_pattern(capsys):
    assert cli(["encoders", "clip-vit-*", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["name"] for r in rows] == list_encoders("clip-vit-*")
    tiny = next(r for r in rows if r["name"] == "clip-vit-tiny")
    assert tiny == {"name": "clip-vit-tiny", "family": "hf_clip", "image_size": 64, "in_chans": 3, "grid": [4, 4],
                    "feature_dim": 64, "weights": "random init"}


def test_import_openai_clip_and_encoder(tmp_path, capsys):
    pytest.importorskip("open_clip")
    from ._released import VIT, open_clip_model, openai_state_dict, pixels, save_local_dir

    model = open_clip_model(VIT)
    torch.save({"state_dict": openai_state_dict(model), "best_epoch": 1}, tmp_path / "PubMedCLIP_tiny.pth")
    assert cli(["import", "openai-clip", str(tmp_path / "PubMedCLIP_tiny.pth"), str(tmp_path / "out")]) == 0
    encoder_dir = json.loads(capsys.readouterr().out)["encoder"]
    imported = create_encoder(encoder_dir).eval()
    x = pixels(32)
    with torch.no_grad():
        torch.testing.assert_close(imported(x)["pooled"], model.encode_image(x), atol=1e-5, rtol=1e-5)
    # the format is checked against the file's layout
    assert cli(["import", "pmc-clip", str(tmp_path / "PubMedCLIP_tiny.pth"), str(tmp_path / "pmc")]) == 2
    assert "not a pmc-clip checkpoint" in capsys.readouterr().err
    folder = save_local_dir(model, VIT, tmp_path / "oc")
    assert cli(["import", "encoder", f"local-dir:{folder}", str(tmp_path / "oc-ours")]) == 0
    assert create_encoder(tmp_path / "oc-ours" / "encoder").fingerprint() == imported.fingerprint()
