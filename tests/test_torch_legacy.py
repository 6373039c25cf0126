"""Reading a module pickled whole by legacy torch.save (MEVF's and QCR's word embedding) without running it."""
from __future__ import annotations

import json
import pickle
import sys
import types
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from encoders import UnsafePickleError
from encoders.torch_legacy import read_legacy_module
from vqa.errors import DataError
from vqa.importers import import_mevf

from .conftest import shared_data
from .test_import_mevf import _Evil

CLASS = ("language_model", "WordEmbedding")


@pytest.fixture
def word_embedding(monkeypatch):
    """BAN's WordEmbedding as MEVF pickles it: a class of the saver's own `language_model` module."""
    module = types.ModuleType("language_model")

    class WordEmbedding(nn.Module):
        def __init__(self, ntoken: int, dim: int) -> None:
            super().__init__()
            self.emb = nn.Embedding(ntoken + 1, dim, padding_idx=ntoken)
            self.emb_ = nn.Embedding(ntoken + 1, dim, padding_idx=ntoken)
            self.dropout = nn.Dropout(0.0)

    WordEmbedding.__module__, WordEmbedding.__qualname__ = CLASS
    module.WordEmbedding = WordEmbedding
    monkeypatch.setitem(sys.modules, "language_model", module)
    return WordEmbedding


def _save_legacy(obj, path) -> None:
    with warnings.catch_warnings():  # torch cannot find the source of a class made in a test, and says so
        warnings.simplefilter("ignore")
        torch.save(obj, path, _use_new_zipfile_serialization=False)


def _evil_legacy_file(path):
    """The legacy format's headers, then an object that would run a command when unpickled."""
    with open(path, "wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
            pickle.dump(header, f, protocol=2)
        pickle.dump(_Evil(), f, protocol=2)
    return path


def test_a_legacy_module_pickle_gives_its_tensors(word_embedding, tmp_path):
    torch.manual_seed(0)
    module = word_embedding(7, 300)
    module.register_buffer("counts", torch.arange(8))
    _save_legacy(module, tmp_path / "embed.pkl")
    tensors = read_legacy_module(tmp_path / "embed.pkl", (CLASS,))
    expected = module.state_dict()
    assert tensors.keys() == expected.keys() == {"emb.weight", "emb_.weight", "counts"}
    assert all(torch.equal(tensors[k], expected[k]) and tensors[k].dtype == expected[k].dtype for k in expected)
    # a plain state dict in the legacy format reads the same
    _save_legacy(expected, tmp_path / "state.pt")
    assert all(torch.equal(read_legacy_module(tmp_path / "state.pt")[k], expected[k]) for k in expected)


def test_a_class_not_named_by_the_caller_or_any_other_global_is_refused(word_embedding, tmp_path):
    _save_legacy(word_embedding(3, 4), tmp_path / "embed.pkl")
    with pytest.raises(UnsafePickleError, match="embed.pkl.*'language_model.WordEmbedding'"):
        read_legacy_module(tmp_path / "embed.pkl")
    with pytest.raises(UnsafePickleError, match=r"evil.pkl.*(posix|os|nt)\.system"):
        read_legacy_module(_evil_legacy_file(tmp_path / "evil.pkl"), (CLASS,))
    whole = (tmp_path / "embed.pkl").read_bytes()
    (tmp_path / "cut.pkl").write_bytes(whole[:-10])  # its last storage's data cut short
    with pytest.raises(ValueError, match="cut.pkl: not a readable legacy torch file.*bytes for"):
        read_legacy_module(tmp_path / "cut.pkl", (CLASS,))
    (tmp_path / "zip.pt").write_bytes(b"PK\x03\x04" + bytes(60))
    with pytest.raises(ValueError, match="zip.pt: not a readable legacy torch file"):
        read_legacy_module(tmp_path / "zip.pt")


def test_mevf_import_writes_the_600d_tfidf_embedding_from_its_pickle(tmp_path):
    src = shared_data("mevf")
    out = import_mevf(src, tmp_path / "mevf")
    words = (out / "dictionary.json").read_text()
    rows = {line.split(" ", 1)[0]: np.array(line.split()[1:], dtype=np.float32)
            for line in (out / "glove_tfidf_600d.txt").read_text().splitlines()}
    released = read_legacy_module(src / "embed_tfidf_weights.pkl", (CLASS,))
    index = json.loads(words)["words"].index("brain")
    assert rows["brain"].shape == (600,)
    assert np.allclose(rows["brain"][:300], np.load(src / "glove6b_init_300d.npy")[index], atol=1e-5)
    assert np.allclose(rows["brain"][300:], released["emb_.weight"][index].numpy(), atol=1e-5)
    # a release whose embedding pickle names another global: refused by name, nothing written
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("pretrained_maml.weights", "pretrained_ae.pth", "dictionary.pkl", "glove6b_init_300d.npy"):
        (bad / name).write_bytes((src / name).read_bytes())
    _evil_legacy_file(bad / "embed_tfidf_weights.pkl")
    with pytest.raises(DataError, match=r"embed_tfidf_weights.pkl.*(posix|os|nt)\.system"):
        import_mevf(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
