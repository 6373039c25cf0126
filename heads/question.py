"""Question encoders: word embeddings (GloVe when given) + GRU/LSTM, as MEVF and QCR use.

Every question encoder maps `(tokens (B, L) long, lengths (B,) long)` to
`{"tokens": (B, L, H), "pooled": (B, H)}` and exposes `output_dim` (= H) and a
`config` dataclass. Tokens are right-padded; `lengths` counts the valid ones.
"""
from __future__ import annotations

import gzip
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

logger = logging.getLogger(__name__)


@dataclass
class QuestionEncoderConfig:
    vocab_size: int  # question words, padding (id `padding_idx`) and unknown included
    embed_dim: int = 300  # GloVe-300, as MEVF
    hidden_dim: int = 1024  # output size H; a bidirectional RNN gives H/2 per direction
    rnn: str = "gru"  # "gru" (MEVF, QCR) or "lstm"
    num_layers: int = 1
    bidirectional: bool = False
    dropout: float = 0.0  # on word embeddings and between stacked RNN layers
    padding_idx: int = 0  # vqa.text.WordVocab.PAD
    freeze_embeddings: bool = False  # keep (GloVe) word vectors fixed while training


class QuestionEncoder(nn.Module):
    """Word embedding + RNN over a right-padded batch of questions.

    Sequences are packed, so padding never reaches the RNN: a question encodes
    to the same vectors whatever the padded length of its batch.
    """

    def __init__(self, config: QuestionEncoderConfig) -> None:
        super().__init__()
        if config.rnn not in ("gru", "lstm"):
            raise ValueError(f"rnn must be 'gru' or 'lstm', got {config.rnn!r}")
        if config.bidirectional and config.hidden_dim % 2:
            raise ValueError(f"a bidirectional encoder needs an even hidden_dim, got {config.hidden_dim}")
        self.config = config
        self.output_dim = config.hidden_dim
        self.embedding = nn.Embedding(config.vocab_size, config.embed_dim, padding_idx=config.padding_idx)
        self.dropout = nn.Dropout(config.dropout)
        rnn_cls = nn.GRU if config.rnn == "gru" else nn.LSTM
        directions = 2 if config.bidirectional else 1
        self.rnn = rnn_cls(
            config.embed_dim,
            config.hidden_dim // directions,
            num_layers=config.num_layers,
            bidirectional=config.bidirectional,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
            batch_first=True,
        )
        self.embedding.weight.requires_grad_(not config.freeze_embeddings)

    def init_embeddings(self, matrix: torch.Tensor | np.ndarray, freeze: bool = False) -> None:
        """Copy pretrained word vectors (vocab_size, embed_dim) into the embedding table."""
        matrix = torch.as_tensor(np.asarray(matrix), dtype=torch.float32)
        expected = tuple(self.embedding.weight.shape)
        if tuple(matrix.shape) != expected:
            raise ValueError(f"embedding matrix has shape {tuple(matrix.shape)}, expected {expected}")
        with torch.no_grad():
            self.embedding.weight.copy_(matrix)
            # The padding row never reaches the RNN (packed), but zero keeps it inert anywhere else.
            self.embedding.weight[self.config.padding_idx].zero_()
        self.config.freeze_embeddings = freeze
        self.embedding.weight.requires_grad_(not freeze)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        batch, max_len = tokens.shape
        words = self.dropout(self.embedding(tokens))  # (B, L, E)
        # pack_padded_sequence wants lengths on the CPU and >= 1.
        packed = pack_padded_sequence(
            words, lengths.clamp(1, max_len).cpu(), batch_first=True, enforce_sorted=False
        )
        out, _ = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=max_len)  # (B, L, H), zeros at padding
        # The pooled vector is read from the output sequence, not the RNN's final state: the same numbers
        # (the last layer's state after each direction's last valid word), but the graph then always runs
        # through `out`, which ONNX export needs (a graph using only the final state fails to export).
        last = (lengths.clamp(1, max_len) - 1).to(out.device)  # (B,)
        forward_end = out[torch.arange(batch, device=out.device), last]  # (B, H)
        if self.config.bidirectional:
            # Forward direction ends at the last valid word, backward at the first.
            half = out.shape[-1] // 2
            pooled = torch.cat([forward_end[:, :half], out[:, 0, half:]], dim=-1)  # (B, H)
        else:
            pooled = forward_end  # (B, H)
        return {"tokens": out, "pooled": pooled}


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open("r", encoding="utf-8")


def _read_glove_text(path: Path, wanted: dict[str, list[int]], dim: int) -> dict[int, np.ndarray]:
    """Vectors of the wanted words from a `word v1 ... vD` text file, keyed by row index."""
    found: dict[int, np.ndarray] = {}
    with _open_text(path) as handle:
        for line_no, line in enumerate(handle, start=1):
            word, _, rest = line.rstrip("\n").partition(" ")
            rows = wanted.get(word)
            if rows is None or rows[0] in found:
                continue
            values = rest.split()
            if len(values) != dim:
                if line_no == 1 and len(values) == 1:
                    continue  # word2vec-style header "<count> <dim>"
                raise ValueError(f"{path}:{line_no}: word {word!r} has {len(values)} values, expected {dim}")
            vector = np.asarray(values, dtype=np.float32)
            for row in rows:
                found[row] = vector
    return found


def load_glove(
    path: str | Path, words: Sequence[str], dim: int, *, seed: int = 0, missing_std: float = 0.1
) -> torch.Tensor:
    """Word vectors for `words`, row i for words[i]: a (len(words), dim) float32 tensor.

    `path` is a GloVe text file (`word v1 ... vD` per line, optionally .gz) or a
    `.npy` matrix whose rows are already aligned with `words` (MEVF's
    `glove6b_init_300d.npy`; all-zero rows count as missing). A word absent from
    the text file is looked up lower-cased; missing words get small random
    vectors, seeded, so the same vocabulary always gets the same table.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"word vectors not found: {path}")
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(len(words), dim, generator=generator) * missing_std
    if path.suffix == ".npy":
        table = np.load(path, allow_pickle=False)
        if table.shape != (len(words), dim):
            raise ValueError(f"{path}: matrix has shape {table.shape}, expected ({len(words)}, {dim}) aligned with the vocabulary")
        present = np.abs(table).sum(axis=1) > 0
        matrix[torch.from_numpy(present)] = torch.from_numpy(table[present].astype(np.float32))
        covered = int(present.sum())
    else:
        wanted: dict[str, list[int]] = {}
        for i, word in enumerate(words):
            wanted.setdefault(word, []).append(i)
        found = _read_glove_text(path, wanted, dim)
        # Second pass only for the rare case of a vocabulary with upper-case words.
        lowered = {w.lower(): rows for w, rows in wanted.items() if rows[0] not in found and w != w.lower()}
        if lowered:
            found.update(_read_glove_text(path, lowered, dim))
        for row, vector in found.items():
            matrix[row] = torch.from_numpy(vector)
        covered = len(found)
    logger.info(
        "word vectors %s: %d/%d words found (%.1f%%), the rest random (std %.2f)",
        path.name, covered, len(words), 100.0 * covered / max(len(words), 1), missing_std,
    )
    return matrix
