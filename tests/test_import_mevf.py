"""`medvqa import mevf`: MEVF's released pickles become safetensors, and nothing else gets unpickled."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from encoders import create_encoder
from heads import load_glove
from vqa.importers import import_mevf
from vqa.errors import DataError

from .conftest import shared_data


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_real_mevf_import(tmp_path):
    src = shared_data("mevf")
    out = import_mevf(src, tmp_path / "mevf")
    encoder = create_encoder(out / "encoder")
    direct = create_encoder("mevf", pretrained=src)
    x = torch.rand(2, 1, 128, 128)
    assert torch.allclose(encoder(x)["pooled"], direct(x)["pooled"])
    glove = load_glove(out / "glove_300d.txt", ["brain", "lung", "xyzzy-not-a-word"], 300)
    table = np.load(src / "glove6b_init_300d.npy")
    words = (out / "dictionary.json").read_text()
    assert glove.shape == (3, 300) and '"brain"' in words
    idx = json.loads(words)["words"].index("brain")
    assert np.allclose(glove[0].numpy(), table[idx], atol=1e-5)


def test_import_refuses_a_pickle_with_another_global(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "dictionary.pkl").write_bytes(pickle.dumps([{"a": 0}, ["a", _Evil()]]))
    with pytest.raises(DataError, match=r"dictionary.pkl.*(posix|os|nt)\.system"):
        import_mevf(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_import_bad_folder(tmp_path):
    with pytest.raises(DataError, match="MEVF folder not found"):
        import_mevf(tmp_path / "none", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="missing dictionary.pkl"):
        import_mevf(tmp_path / "empty", tmp_path / "out")
