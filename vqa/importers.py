"""MEVF's released files as medvqa inputs: a safetensors encoder and a GloVe table (`medvqa import mevf`).

Reads `pretrained_maml.weights` and `pretrained_ae.pth` (image side),
`dictionary.pkl` and `glove6b_init_300d.npy` (question words) with a restricted
unpickler that builds only plain data and numpy arrays, and writes:
  OUT/encoder/        the MEVF image side (config.json + model.safetensors) for `--encoder OUT/encoder`
  OUT/glove_300d.txt  the GloVe vectors of MEVF's dictionary, as a GloVe text file for `--glove`
  OUT/dictionary.json MEVF's question words in its own order
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from .errors import DataError
from .io import atomic_dir

log = logging.getLogger(__name__)
DICTIONARY, GLOVE = "dictionary.pkl", "glove6b_init_300d.npy"


def read_mevf_dictionary(src: Path) -> list[str]:
    """MEVF's idx2word list from dictionary.pkl ([word2idx, idx2word]), read without running code."""
    from encoders import UnsafePickleError, safe_unpickle

    path = src / DICTIONARY
    if not path.is_file():
        raise DataError(f"{src}: missing {DICTIONARY}")
    try:
        data = safe_unpickle(path)
    except UnsafePickleError as e:
        raise DataError(str(e)) from None
    if not (isinstance(data, list) and len(data) == 2 and isinstance(data[1], list)
            and all(isinstance(w, str) for w in data[1])):
        raise DataError(f"{path}: expected [word2idx, idx2word] as MEVF writes it")
    return data[1]


def import_mevf(src: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Convert MEVF's release folder `src` into `out` (written atomically)."""
    from encoders import UnsafePickleError, create_encoder

    src = Path(src)
    if not src.is_dir():
        raise DataError(f"{src}: MEVF folder not found")
    words = read_mevf_dictionary(src)
    glove_path = src / GLOVE
    if not glove_path.is_file():
        raise DataError(f"{src}: missing {GLOVE}")
    glove = np.load(glove_path, allow_pickle=False)
    if glove.shape[0] != len(words):
        raise DataError(f"{glove_path}: {glove.shape[0]} vectors for {len(words)} dictionary words")
    try:
        encoder = create_encoder("mevf", pretrained=src)
    except UnsafePickleError as e:
        raise DataError(str(e)) from None
    with atomic_dir(out, overwrite=overwrite) as tmp:
        encoder.save_pretrained(tmp / "encoder")
        lines = (f"{w} " + " ".join(f"{x:.6g}" for x in vec) for w, vec in zip(words, glove) if " " not in w)
        (tmp / "glove_300d.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        (tmp / "dictionary.json").write_text(json.dumps({"words": words}, ensure_ascii=False) + "\n")
    log.info("imported MEVF from %s: encoder (%d-d features), %d word vectors", src, encoder.feature_dim, len(words))
    return Path(out)
