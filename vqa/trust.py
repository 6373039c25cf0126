"""Trust scores: is the answer backed by training questions like this one?

A model's own confidence ranks its answers poorly among questions unlike any it trained on, and
temperature scaling, a monotone map, cannot reorder them. The trust score of Jiang, Kim, Guan and
Gupta ("To Trust or Not to Trust a Classifier", NeurIPS 2018) looks at the training set instead: in
the head's fused (image + question) space, how much nearer the nearest training question whose
answer is the predicted one lies than the nearest training question with any other answer,

    trust = log(d_other / d_predicted),   d: Euclidean distance between L2-normalised vectors.

Positive: the neighbourhood agrees with the answer. Distances on the unit sphere are at most 2, so
an answer no training question had (or a vocabulary of one answer) counts as 2 away.

Two more scores read the training questions' words. Familiarity: did training ask about this very
image in nearly the same words? The largest content-word overlap (Jaccard, `vqa.stats.word_overlap`)
between the question and the training questions about the same image (identical pixels, `image_id`),
0 for an image training never saw. Agreement, the trust score's counterpart in words: that overlap
among the questions about the image whose training answer is the one given, less the overlap among
those answered otherwise (from -1, a restated question answered otherwise in training, to 1). A
model answers a restated training question from memory, right far more often than a new one
(VQA-RAD: 82 against 52 % of closed test questions, `benchmarks/validation_shift.py`), which
neither its logits nor the fused space tell apart (docs/results.md measures what they add). For
an image training never saw both are 0: they say only that the question is new.

The calibration (`vqa.calibration`) turns (temperature-scaled confidence, trust, familiarity,
agreement) into the probability that the answer is right with a logistic fit per branch on
validation. Stored in the bundle as `trust.safetensors`: the training questions' fused vectors
(float16), their answer ids, and in its metadata the content words asked about each training image
with their answer ids (memories written before familiarity lack them: their calibration reads trust
alone).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from .errors import DataError
from .io import atomic_write_safetensors
from .stats import content_words, word_overlap

TRUST_FILE = "trust.safetensors"
MAX_TRUST_ROWS = 50_000  # 50k x 256 float16 = 25 MB in the bundle; beyond, a fixed random subset
_FAR = 2.0  # the unit sphere's diameter: the distance of an answer no training question had
_EPS = 1e-4  # two identical questions: a finite ratio
_CHUNK = 1024  # test questions scored at once (a chunk x rows distance matrix)


def image_id(image) -> str:
    """An image's identity for familiarity: a hash of its 8-bit gray pixels and size, as `encoders.load_image` reads
    it (a file, or a PIL image in any mode: the predictor reads uploads so). The same file, or the same pixels
    uploaded, give the same id; a re-encoded JPEG does not (its question then counts as one about a new image:
    less familiar, never more)."""
    from encoders import load_image

    gray = load_image(image).convert("L")
    digest = hashlib.blake2b(f"{gray.size[0]}x{gray.size[1]}".encode(), digest_size=10)
    digest.update(gray.tobytes())
    return digest.hexdigest()


def image_ids(images: Sequence, progress: bool = False) -> list[str]:
    """`image_id` of each of `images` (PIL images or files), each distinct one read once."""
    from tqdm import tqdm

    from .batches import unique_images

    distinct, rows = unique_images(images)
    ids = [image_id(im) for im in tqdm(distinct, desc="image ids", unit="img", disable=not progress, leave=False)]
    return [ids[r] for r in rows]


def asked_about(trust: "TrustScorer | None", records: Sequence, progress: bool = False) -> dict:
    """The questions and image_ids of `records` (`vqa.data.Record`s) as `Calibration.fit` and `.confidence` take
    them, where the `trust` memory reads familiarity; else nothing (no image is read)."""
    if trust is None or trust.asked is None:
        return {}
    return {"questions": [r.question for r in records], "image_ids": image_ids([r.image for r in records], progress)}


@dataclass
class TrustScorer:
    features: torch.Tensor  # (N, F) training questions' fused vectors, L2-normalised, float32 in memory
    answers: torch.Tensor  # (N,) their answer ids
    # image_id -> (content words, answer id) of each distinct training question about that image (-1: an answer
    # outside the vocabulary); None: a memory from before familiarity (trust scores only)
    asked: dict[str, list[tuple[frozenset[str], int]]] | None = None

    @property
    def feature_count(self) -> int:
        """How many scores `features_of` gives per question: trust, then familiarity and agreement where the
        memory has the training questions."""
        return 1 if self.asked is None else 3

    def familiarity(self, questions: Sequence[str], image_ids: Sequence[str]) -> torch.Tensor:
        """(Q,) the largest word overlap of each question with a training question about the same image (0: none)."""
        pairs = zip(questions, image_ids, strict=True)
        return torch.tensor([max(self._overlaps(question, image, None)) for question, image in pairs])

    def familiarity_and_agreement(self, questions: Sequence[str], image_ids: Sequence[str],
                                  predicted: Sequence[int]) -> torch.Tensor:
        """(Q, 2): each question's familiarity, and its agreement with the `predicted` answer ids (the overlap among
        the training questions about its image answered as predicted, less among those answered otherwise)."""
        out = []
        for question, image, answer in zip(questions, image_ids, predicted, strict=True):
            same, other = self._overlaps(question, image, int(answer))
            out.append((max(same, other), same - other))
        return torch.tensor(out, dtype=torch.float32).reshape(len(out), 2)

    def _overlaps(self, question: str, image: str, answer: int | None) -> tuple[float, float]:
        """The largest word overlap with the training questions about `image` answered `answer`, and with the others
        (all of them when `answer` is None)."""
        if self.asked is None:
            raise ValueError("this trust memory was written before familiarity: it has no training questions")
        words, same, other = content_words(question), 0.0, 0.0
        for seen, given in self.asked.get(image, ()):
            if given == answer:
                same = max(same, word_overlap(words, seen))
            else:
                other = max(other, word_overlap(words, seen))
        return same, other

    def features_of(self, fused: torch.Tensor, predicted: torch.Tensor, questions: Sequence[str] | None = None,
                    image_ids: Sequence[str] | None = None) -> np.ndarray:
        """(Q, feature_count): the trust score of each predicted answer, then (with `asked`) each question's
        familiarity and agreement, which need the `questions` and their images' `image_ids`."""
        cols = [self.score(fused, predicted)[:, None]]
        if self.asked is not None:
            if questions is None or image_ids is None:
                raise DataError("this calibration reads familiarity (was the question asked about this image in "
                                "training?), which needs the questions and their images")
            cols.append(self.familiarity_and_agreement(questions, image_ids, predicted.tolist()))
        return torch.cat(cols, 1).numpy().astype(np.float64)

    def score(self, fused: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
        """(Q, F) fused vectors and (Q,) predicted answer ids -> (Q,) trust scores (higher: more trusted)."""
        if fused.dim() != 2 or fused.shape[1] != self.features.shape[1]:
            raise ValueError(f"trust scores need (Q, {self.features.shape[1]}) fused vectors, got {tuple(fused.shape)}")
        x = torch.nn.functional.normalize(fused.float(), dim=1)
        out = []
        for start in range(0, len(x), _CHUNK):
            dist = torch.cdist(x[start:start + _CHUNK], self.features)  # (q, N)
            same = self.answers[None, :] == predicted[start:start + _CHUNK, None].to(self.answers.device)
            far = dist.new_full((len(dist), 1), _FAR)  # every minimum is at most _FAR, also over no neighbour
            d_pred = torch.cat([dist.masked_fill(~same, _FAR), far], 1).min(1).values
            d_other = torch.cat([dist.masked_fill(same, _FAR), far], 1).min(1).values
            out.append(torch.log((d_other + _EPS) / (d_pred + _EPS)))
        return torch.cat(out) if out else torch.zeros(0)

    @classmethod
    def fit(cls, fused: torch.Tensor, answers: torch.Tensor, max_rows: int = MAX_TRUST_ROWS, seed: int = 0,
            questions: Sequence[str] | None = None, image_ids: Sequence[str] | None = None) -> "TrustScorer":
        """From the training questions' fused vectors (N, F) and answer ids (N,); ids < 0 (answers outside the
        vocabulary) are left out, and beyond `max_rows` a fixed random subset is kept. With the `questions` and
        their images' `image_ids`, the familiarity memory too (every question: words are cheap to keep)."""
        asked = None
        if questions is not None and image_ids is not None:
            if not len(questions) == len(image_ids) == len(answers):
                raise ValueError(f"{len(answers)} answers but {len(questions)} questions and {len(image_ids)} images")
            distinct: dict[str, set[tuple[frozenset[str], int]]] = {}
            for question, image, answer in zip(questions, image_ids, answers.tolist()):
                distinct.setdefault(image, set()).add((content_words(question), max(int(answer), -1)))
            asked = {image: sorted(pairs, key=lambda p: (sorted(p[0]), p[1])) for image, pairs in distinct.items()}
        keep = answers >= 0
        fused, answers = fused[keep].float(), answers[keep].long()
        if len(fused) > max_rows:
            pick = torch.randperm(len(fused), generator=torch.Generator().manual_seed(seed))[:max_rows].sort().values
            fused, answers = fused[pick], answers[pick]
        # rounded as `save` stores them: the calibration fitted on this memory is the one a loaded bundle applies
        return cls(torch.nn.functional.normalize(fused, dim=1).half().float(), answers, asked)

    def save(self, folder: Path) -> None:
        metadata = {"format": "pt"}
        if self.asked is not None:
            metadata["asked"] = json.dumps({image: [[" ".join(sorted(words)), answer] for words, answer in pairs]
                                            for image, pairs in self.asked.items()}, sort_keys=True)
        atomic_write_safetensors(Path(folder) / TRUST_FILE, {
            "features": self.features.half().contiguous(), "answers": self.answers.to(torch.int32).contiguous()},
            metadata=metadata)

    @classmethod
    def load(cls, folder: Path) -> "TrustScorer | None":
        path = Path(folder) / TRUST_FILE
        if not path.is_file():
            return None
        try:
            t = load_file(str(path))
            features, answers = t["features"].float(), t["answers"].long()
            with safe_open(str(path), "pt") as f:
                stored = (f.metadata() or {}).get("asked")
            asked = None if stored is None else {str(image): [(frozenset(str(words).split()), int(answer))
                                                              for words, answer in pairs]
                                                 for image, pairs in json.loads(stored).items()}
        except (SafetensorError, OSError, KeyError, ValueError, AttributeError, TypeError) as e:
            raise DataError(f"{path}: not a readable trust-score memory ({e})") from None
        if features.dim() != 2 or answers.shape != (features.shape[0],):
            raise DataError(f"{path}: expected features (N, F) and answers (N,), got {tuple(features.shape)} and "
                            f"{tuple(answers.shape)}")
        return cls(features, answers, asked)
