"""Released weights as medvqa inputs (`medvqa import`): safetensors encoder folders, and MEVF's GloVe table.

`import_encoder(fmt, src, out)` converts a released checkpoint into our encoder folder (config.json +
model.safetensors) that `--encoder OUT` loads without open_clip's loaders or any pickle:
  openai-clip  an OpenAI-format CLIP file (PubMedCLIP's RN50/RN50x4/ViT-B/32 .pth, OpenAI's .pt)
  pmc-clip     PMC-CLIP's checkpoint.pt or its image_encoder(resnet50).pth
  encoder      anything `create_encoder` accepts (hf-hub:..., local-dir:..., open_clip:..., a registered name)

MEVF (`import_mevf`):

Reads `pretrained_maml.weights` and `pretrained_ae.pth` (image side),
`dictionary.pkl` and `glove6b_init_300d.npy` (question words) with a restricted
unpickler that builds only plain data and numpy arrays, and writes:
  OUT/encoder/        the MEVF image side (config.json + model.safetensors) for `--encoder OUT/encoder`
  OUT/glove_300d.txt  the GloVe vectors of MEVF's dictionary, as a GloVe text file for `--glove`
  OUT/dictionary.json MEVF's question words in its own order
and, where the release has `embed_tfidf_weights.pkl` (MEVF's and QCR's question side: BAN's word embedding, each
word's GloVe vector beside a tf-idf-weighted mean of the GloVe vectors of the words it shares questions with; a
torch 0.4 module pickle, read by `encoders.torch_legacy` without running it):
  OUT/glove_tfidf_600d.txt  both halves side by side, for `--glove ... --embed-dim 600`: the 600-d embedding
                            the references train (both halves are trainable there, so one table is the same)
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from .errors import DataError
from .io import atomic_dir

log = logging.getLogger(__name__)
DICTIONARY, GLOVE, TFIDF = "dictionary.pkl", "glove6b_init_300d.npy", "embed_tfidf_weights.pkl"
TFIDF_CLASS = ("language_model", "WordEmbedding")  # BAN's module, as MEVF and QCR pickle it


ENCODER_FORMATS = {"openai-clip": ("openai-clip", "openai-visual"), "pmc-clip": ("pmc-clip", "openai-visual"),
                   "encoder": None}


def import_encoder(fmt: str, src: str, out: str | Path, overwrite: bool = False, **encoder_args) -> Path:
    """Load `src` as format `fmt` (checked against the file's layout) and save it as a medvqa encoder folder."""
    from encoders import create_encoder, detect_format, read_weights

    if fmt not in ENCODER_FORMATS:
        raise DataError(f"unknown import format {fmt!r}; known: {', '.join(ENCODER_FORMATS)}")
    if ENCODER_FORMATS[fmt] is not None:
        path = Path(src)
        if not path.is_file():
            raise DataError(f"{src}: file not found")
        found = detect_format(read_weights(path))
        if found not in ENCODER_FORMATS[fmt]:
            raise DataError(f"{src}: not a {fmt} checkpoint (its tensors look like {found or 'no known layout'})")
    encoder = create_encoder(src, **encoder_args)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        encoder.save_pretrained(tmp / "encoder")
    log.info("imported %s from %s: %s encoder, %d-d features, grid %s", fmt, src, encoder.family,
             encoder.feature_dim, encoder.grid_size)
    return Path(out)


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
        tfidf = _tfidf_embedding(src / TFIDF, len(words)) if (src / TFIDF).is_file() else None
    except UnsafePickleError as e:
        raise DataError(str(e)) from None
    with atomic_dir(out, overwrite=overwrite) as tmp:
        encoder.save_pretrained(tmp / "encoder")
        _write_vectors(tmp / "glove_300d.txt", words, glove)
        if tfidf is not None:
            _write_vectors(tmp / "glove_tfidf_600d.txt", words, tfidf)
        (tmp / "dictionary.json").write_text(json.dumps({"words": words}, ensure_ascii=False) + "\n")
    log.info("imported MEVF from %s: encoder (%d-d features), %d word vectors%s", src, encoder.feature_dim,
             len(words), ", and its 600-d tf-idf embedding" if tfidf is not None else "")
    return Path(out)


def _tfidf_embedding(path: Path, n_words: int) -> np.ndarray:
    """BAN's WordEmbedding from `path`: (n_words, 600), each word's two 300-d halves side by side."""
    from encoders.torch_legacy import read_legacy_module

    try:
        tensors = read_legacy_module(path, (TFIDF_CLASS,))
    except ValueError as e:
        raise DataError(str(e)) from None
    halves = [tensors.get(name) for name in ("emb.weight", "emb_.weight")]
    # one row per word and a last one for padding
    if any(h is None or tuple(h.shape) != (n_words + 1, 300) for h in halves):
        raise DataError(f"{path}: expected emb.weight and emb_.weight of shape ({n_words + 1}, 300) for the "
                        f"{n_words} dictionary words, found {({k: tuple(v.shape) for k, v in tensors.items()})}")
    return np.concatenate([h[:n_words].float().numpy() for h in halves], axis=1)


def _write_vectors(path: Path, words: list[str], vectors: np.ndarray) -> None:
    """A GloVe text file (`word v1 ... vD` per line) of `words` (those with a space cannot be written)."""
    lines = (f"{w} " + " ".join(f"{x:.6g}" for x in vec) for w, vec in zip(words, vectors) if " " not in w)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
