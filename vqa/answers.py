"""The answer vocabulary, with the protocol that built it stated alongside.

Two protocols appear in the literature and give different numbers:
- "train-only": answers seen in the training split (ours; nothing of test leaks in);
- "train+test candidates": the references' fixed list, VQA-RAD's `answer_all_list.json` as MEVF,
  QCR and PubMedCLIP use it. The name is the one the literature gives it (and bundles record); the
  file itself holds MEVF's 458 training answers in MEVF's spelling, none only in test (the
  references' other departure, the epoch picked on test, is the model selection's). Results must
  say which was used.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from .data.record import CLOSED, OPEN, Record
from .errors import DataError
from .io import atomic_write_json, read_json
from .text import normalize_answer

TRAIN_ONLY = "train-only"
CANDIDATES = "train+test candidates"


@dataclass
class AnswerVocab:
    """Answers -> class ids, plus which answers occur with closed and with open questions."""

    answers: list[str]
    protocol: str = TRAIN_ONLY
    closed: list[str] = field(default_factory=list)  # answers seen with CLOSED questions
    open: list[str] = field(default_factory=list)  # answers seen with OPEN questions

    def __post_init__(self) -> None:
        if len(set(self.answers)) != len(self.answers):
            dupes = [a for a, c in Counter(self.answers).items() if c > 1][:5]
            raise DataError(f"answer vocabulary has duplicate answers, e.g. {dupes}")
        self._index = {a: i for i, a in enumerate(self.answers)}

    def __len__(self) -> int:
        return len(self.answers)

    def __contains__(self, answer: str) -> bool:
        return answer in self._index

    def index(self, answer: str) -> int:
        """Class id of a normalised answer, or -1 when it is outside the vocabulary."""
        return self._index.get(answer, -1)

    def type_mask(self, answer_type: str) -> list[bool]:
        """Which classes are valid answers for `answer_type` questions (QCR routes by this)."""
        group = set(self.closed if answer_type == CLOSED else self.open)
        return [a in group for a in self.answers]

    @classmethod
    def from_records(cls, records: Sequence[Record], min_count: int = 1) -> "AnswerVocab":
        """The train-only vocabulary: answers seen at least `min_count` times, most frequent first."""
        counts = Counter(r.answer for r in records)
        answers = sorted((a for a, c in counts.items() if c >= min_count), key=lambda a: (-counts[a], a))
        return cls(answers, TRAIN_ONLY, *_groups(records, set(answers)))

    @classmethod
    def from_candidates(cls, path: str | Path, records: Sequence[Record] = ()) -> "AnswerVocab":
        """MEVF's candidate list (a JSON list or {answer: id} object: `answer_all_list.json`).

        `records` (train) decide which candidates count as closed or open; a candidate
        never seen in train is allowed in both groups, as the reference heads allow it.
        """
        data = read_json(path)
        if isinstance(data, dict):
            data = sorted(data, key=lambda a: data[a])
        if not isinstance(data, list) or not data:
            raise DataError(f"{path}: expected a non-empty JSON list of answers")
        # The list was normalised by the references' rules ('x-ray' -> 'xray'): map each
        # candidate onto the training answer it stands for, so the classes line up with ours.
        ours: dict[str, str] = {}
        for answer, _ in Counter(r.answer for r in records).most_common():
            ours.setdefault(_loose(answer), answer)  # the most frequent spelling stands for the rest
        answers = list(dict.fromkeys(ours.get(_loose(str(a)), normalize_answer(a)) for a in data))
        closed, open_ = _groups(records, set(answers))
        unseen = [a for a in answers if a not in set(closed) | set(open_)]
        return cls(answers, CANDIDATES, closed + unseen, open_ + unseen)

    @classmethod
    def union(cls, vocabs: Sequence["AnswerVocab"]) -> "AnswerVocab":
        """Every answer of `vocabs` (of one protocol), in order of first appearance; each answer group the union
        of theirs (an ensemble of members trained on different carves of one training split)."""
        protocols = {v.protocol for v in vocabs}
        if len(protocols) != 1:
            raise DataError(f"answer vocabularies of different protocols cannot be joined: {sorted(protocols)}")
        answers = list(dict.fromkeys(a for v in vocabs for a in v.answers))
        return cls(answers, protocols.pop(), sorted({a for v in vocabs for a in v.closed}),
                   sorted({a for v in vocabs for a in v.open}))

    def coverage(self, records: Iterable[Record]) -> float:
        """Share of records whose answer is in the vocabulary (the ceiling on accuracy)."""
        records = list(records)
        return sum(r.answer in self._index for r in records) / max(len(records), 1)

    def to_dict(self) -> dict:
        return {"protocol": self.protocol, "answers": self.answers, "closed": self.closed, "open": self.open}

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "AnswerVocab":
        data = read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("answers"), list):
            raise DataError(f"{path}: expected a JSON object with an 'answers' list")
        return cls(list(data["answers"]), str(data.get("protocol", TRAIN_ONLY)),
                   list(data.get("closed", [])), list(data.get("open", [])))


def _loose(answer: str) -> str:
    return re.sub(r"[^a-z0-9]", "", answer.lower())


def _groups(records: Sequence[Record], keep: set[str]) -> tuple[list[str], list[str]]:
    closed = sorted({r.answer for r in records if r.answer_type == CLOSED and r.answer in keep})
    open_ = sorted({r.answer for r in records if r.answer_type == OPEN and r.answer in keep})
    return closed, open_
