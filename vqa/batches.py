"""Questions as tensors, and the image-feature table they index into.

Heads train on cached features: every image of a split is encoded once into a
table (I, N, D), and each question carries the row of its image. A batch is then
a handful of tensor index operations, with no image decoding and no DataLoader.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .answers import AnswerVocab
from .data.record import CLOSED, Record
from .text import WordVocab

IGNORE_INDEX = -100  # answer outside the vocabulary: contributes no loss (heads' convention)
CLOSED_ID, OPEN_ID = 0, 1  # index of each answer type in the heads' `type_logits`


@dataclass
class QuestionTensors:
    """All questions of one split, aligned row by row."""

    rows: torch.Tensor  # (Q,) row of the question's image in the feature table
    tokens: torch.Tensor  # (Q, L) word ids, right-padded
    lengths: torch.Tensor  # (Q,)
    answers: torch.Tensor  # (Q,) answer id, or the index of the right choice; IGNORE_INDEX if unknown
    types: torch.Tensor  # (Q,) CLOSED_ID / OPEN_ID from the dataset's answer_type
    choice_tokens: torch.Tensor | None = None  # (Q, C, Lc) multiple choice
    choice_lengths: torch.Tensor | None = None  # (Q, C)

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def select(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name)[index] for f in fields(self) if getattr(self, f.name) is not None}

    def batches(self, batch_size: int, shuffle: bool = False,
                generator: torch.Generator | None = None) -> Iterator[dict[str, torch.Tensor]]:
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        for start in range(0, len(self), batch_size):
            yield self.select(order[start:start + batch_size])


def image_source_key(record: Record) -> str | int:
    """Identity of a record's image before hashing: its path, or the in-memory object."""
    return str(record.image) if isinstance(record.image, Path) else id(record.image)


def unique_images(records: Sequence[Record]) -> tuple[list, list[int]]:
    """The distinct images of `records` (in first-seen order) and each record's index into them."""
    first: dict[str | int, int] = {}
    images, index = [], []
    for r in records:
        key = image_source_key(r)
        if key not in first:
            first[key] = len(images)
            images.append(r.image)
        index.append(first[key])
    return images, index


def encode_questions(records: Sequence[Record], rows: Sequence[int], words: WordVocab,
                     answers: AnswerVocab | None, max_len: int = 12, choice_len: int = 8) -> QuestionTensors:
    """Tokenise questions (and choices) and look up answer ids; `rows` maps each record to its image row."""
    encoded = [words.encode(r.question, max_len) for r in records]
    multiple_choice = bool(records) and all(r.choices for r in records)
    if multiple_choice:
        targets = [r.choices.index(r.answer) if r.answer in r.choices else IGNORE_INDEX for r in records]
    else:
        targets = [answers.index(r.answer) if answers is not None else -1 for r in records]
        targets = [t if t >= 0 else IGNORE_INDEX for t in targets]
    out = QuestionTensors(
        rows=torch.tensor(list(rows), dtype=torch.long),
        tokens=torch.tensor([ids for ids, _ in encoded], dtype=torch.long).view(len(records), max_len),
        lengths=torch.tensor([n for _, n in encoded], dtype=torch.long),
        answers=torch.tensor(targets, dtype=torch.long),
        types=torch.tensor([CLOSED_ID if r.answer_type == CLOSED else OPEN_ID for r in records], dtype=torch.long),
    )
    if multiple_choice:
        n_choices = max(len(r.choices) for r in records)
        toks = torch.zeros(len(records), n_choices, choice_len, dtype=torch.long)
        lens = torch.zeros(len(records), n_choices, dtype=torch.long)  # 0 = absent choice
        for i, r in enumerate(records):
            for j, choice in enumerate(r.choices):
                ids, n = words.encode(choice, choice_len)
                toks[i, j], lens[i, j] = torch.tensor(ids), n
        out.choice_tokens, out.choice_lengths = toks, lens
    return out
