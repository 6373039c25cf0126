"""Questions as tensors, and the image-feature table they index into.

Heads train on cached features: every image of a split is encoded once into a
table (I, N, D), and each question carries the row of its image. A batch is then
a handful of tensor index operations, with no image decoding and no DataLoader.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields
from typing import Iterator, Protocol, Sequence

import torch

from .answers import AnswerVocab
from .data.record import CLOSED, Record

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # answer outside the vocabulary: contributes no loss (heads' convention)
CLOSED_ID, OPEN_ID = 0, 1  # index of each answer type in the heads' `type_logits`


@dataclass
class QuestionTensors:
    """All questions of one split, aligned row by row."""

    rows: torch.Tensor  # (Q,) row of the question's image in the feature table
    tokens: torch.Tensor  # (Q, L) word ids, right-padded
    lengths: torch.Tensor  # (Q,)
    answers: torch.Tensor  # (Q,) answer id, or the index of the right choice; IGNORE_INDEX if unknown
    types: torch.Tensor  # (Q,) CLOSED_ID / OPEN_ID from the dataset's answer_type; IGNORE_INDEX at inference
    choice_tokens: torch.Tensor | None = None  # (Q, C, Lc) multiple choice
    choice_lengths: torch.Tensor | None = None  # (Q, C)

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def select(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name)[index] for f in fields(self) if getattr(self, f.name) is not None}

    def batches(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """Consecutive batches in order (inference; training order is `vqa.training.epoch_plan`'s)."""
        for start in range(0, len(self), batch_size):
            yield self.select(torch.arange(start, min(start + batch_size, len(self))))


def unique_images(images: Sequence) -> tuple[list, list[int]]:
    """The distinct images of `images` (first-seen order) and each one's index among them.

    Files are the same image when their absolute paths are; in-memory images (PIL, arrays)
    when they are the same object."""
    first: dict[str | int, int] = {}
    distinct, index = [], []
    for image in images:
        key = os.path.abspath(image) if isinstance(image, (str, os.PathLike)) else id(image)
        if key not in first:
            first[key] = len(distinct)
            distinct.append(image)
        index.append(first[key])
    return distinct, index


class Tokenizer(Protocol):
    """What turns a question into ids: `vqa.text.WordVocab`, or a pretrained text tower used as the question
    encoder (`encoders.TextQuestionEncoder`, with its own tokenizer)."""

    def encode(self, text: str, max_len: int) -> tuple[list[int], int]: ...

    def unknown_words(self, text: str) -> list[str]: ...

    @property
    def vocab_size(self) -> int: ...


def encode_queries(questions: Sequence[str], rows: Sequence[int], words: Tokenizer, max_len: int = 12,
                   choices: Sequence[Sequence[str]] | None = None, choice_len: int = 8) -> QuestionTensors:
    """Questions (and their choices) as tensors, without targets: what inference feeds the model.

    `rows` maps each question to its image's row in the image table."""
    n = len(questions)
    encoded = [words.encode(q, max_len) for q in questions]
    out = QuestionTensors(
        rows=torch.tensor(list(rows), dtype=torch.long),
        tokens=torch.tensor([ids for ids, _ in encoded], dtype=torch.long).view(n, max_len),
        lengths=torch.tensor([k for _, k in encoded], dtype=torch.long),
        answers=torch.full((n,), IGNORE_INDEX, dtype=torch.long),
        types=torch.full((n,), IGNORE_INDEX, dtype=torch.long),
    )
    if choices is not None:
        n_choices = max(len(c) for c in choices)
        toks = torch.zeros(n, n_choices, choice_len, dtype=torch.long)  # (Q, C, Lc)
        lens = torch.zeros(n, n_choices, dtype=torch.long)  # (Q, C); 0 = absent choice
        for i, options in enumerate(choices):
            for j, choice in enumerate(options):
                ids, k = words.encode(str(choice), choice_len)
                toks[i, j], lens[i, j] = torch.tensor(ids), k
        out.choice_tokens, out.choice_lengths = toks, lens
    return out


def _say_cut(records: Sequence[Record], words: Tokenizer, lengths: torch.Tensor, max_len: int) -> None:
    """Warn when questions are longer than `max_len` tokens (read cut): MEVF's 12 words fit VQA-RAD's English,
    not SLAKE's Chinese, whose every character is a token. Only those encoded at `max_len` are measured again."""
    full = {i: words.encode(records[i].question, len(records[i].question) + 1)[1]  # a token is at least a character
            for i in (lengths >= max_len).nonzero().flatten().tolist()}
    cut = [i for i, n in full.items() if n > max_len]
    if cut:
        log.warning("%d of %d questions have more than %d tokens (up to %d) and are read cut, e.g. %r: --max-len "
                    "reads more", len(cut), len(records), max_len, max(full.values()), records[cut[0]].question)


def encode_questions(records: Sequence[Record], rows: Sequence[int], words: Tokenizer,
                     answers: AnswerVocab | None, max_len: int = 12, choice_len: int = 8) -> QuestionTensors:
    """A dataset's questions as tensors with their targets: the answer id (or the index of the right
    choice; IGNORE_INDEX when unknown) and the dataset's own answer type."""
    multiple_choice = bool(records) and all(r.choices for r in records)
    out = encode_queries([r.question for r in records], rows, words, max_len,
                         [r.choices for r in records] if multiple_choice else None, choice_len)
    _say_cut(records, words, out.lengths, max_len)
    if multiple_choice:
        targets = [r.choices.index(r.answer) if r.answer in r.choices else IGNORE_INDEX for r in records]
    else:
        targets = [answers.index(r.answer) if answers is not None else -1 for r in records]
        targets = [t if t >= 0 else IGNORE_INDEX for t in targets]
    out.answers = torch.tensor(targets, dtype=torch.long)
    out.types = torch.tensor([CLOSED_ID if r.answer_type == CLOSED else OPEN_ID for r in records], dtype=torch.long)
    return out
