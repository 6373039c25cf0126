"""Answer normalisation, question tokenisation and the question word vocabulary."""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from .errors import DataError
from .io import atomic_write_text

_NUMBER_WORDS = {
    "zero": "0", "none": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
# Punctuation that never carries meaning in an answer; '-' ('x-ray', 't2-weighted'),
# '/' ('pa/ap') and '.' before a digit ('3.5', '.5') do, so they are kept ('L5.' is 'l5').
_DROP_PUNCT = re.compile(r"[\"'`,;:!?()\[\]{}]")
_TRAILING_DOT = re.compile(r"\.(?!\d)")
_TOKEN = re.compile(r"[a-z0-9]+(?:[-.'][a-z0-9]+)*|[^\sa-z0-9]")


def normalize_answer(answer: object) -> str:
    """Canonical form of an answer for vocabularies and exact-match accuracy.

    Lower case, punctuation and articles dropped, number words as digits
    ("Two" -> "2"), whitespace collapsed, as the VQA evaluation protocol does.
    """
    text = str(answer).lower().strip()
    text = _DROP_PUNCT.sub(" ", text)
    text = _TRAILING_DOT.sub(" ", text)
    words = [_NUMBER_WORDS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def tokenize(text: str) -> list[str]:
    """Lower-case word tokens of a question: words (with inner '-', '.', "'"), then punctuation."""
    return _TOKEN.findall(text.lower())


@dataclass
class WordVocab:
    """Question words -> ids; 0 is padding, 1 is unknown."""

    words: list[str] = field(default_factory=lambda: ["<pad>", "<unk>"])

    PAD = 0
    UNK = 1

    def __post_init__(self) -> None:
        if self.words[:2] != ["<pad>", "<unk>"]:
            raise DataError(f"vocabulary must start with '<pad>', '<unk>', got {self.words[:2]}")
        self._index = {w: i for i, w in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words)

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    @classmethod
    def build(cls, questions: Iterable[str], min_count: int = 1) -> "WordVocab":
        """Vocabulary of the words seen at least `min_count` times, most frequent first."""
        counts = Counter(tok for q in questions for tok in tokenize(q))
        kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(["<pad>", "<unk>", *kept])

    def encode(self, question: str, max_len: int) -> tuple[list[int], int]:
        """Token ids padded/truncated to `max_len`, and the unpadded length (at least 1)."""
        ids = [self._index.get(tok, self.UNK) for tok in tokenize(question)][:max_len]
        length = max(len(ids), 1)
        return ids + [self.PAD] * (max_len - len(ids)), length

    def unknown_words(self, question: str) -> list[str]:
        """The question's words (not punctuation) the vocabulary does not hold."""
        return [w for w in tokenize(question) if w not in self._index and any(c.isalnum() for c in w)]

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps({"words": self.words}, ensure_ascii=False))

    @classmethod
    def load(cls, path: str | Path) -> "WordVocab":
        from .io import read_json

        data = read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("words"), list):
            raise DataError(f"{path}: expected a JSON object with a 'words' list")
        return cls(list(data["words"]))
