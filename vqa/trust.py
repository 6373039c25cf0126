"""Trust scores: is the answer backed by training questions like this one?

A model's own confidence ranks its answers poorly among questions unlike any it trained on, and
temperature scaling, a monotone map, cannot reorder them. The trust score of Jiang, Kim, Guan and
Gupta ("To Trust or Not to Trust a Classifier", NeurIPS 2018) looks at the training set instead: in
the head's fused (image + question) space, how much nearer the nearest training question whose
answer is the predicted one lies than the nearest training question with any other answer,

    trust = log(d_other / d_predicted),   d: Euclidean distance between L2-normalised vectors.

Positive: the neighbourhood agrees with the answer. Distances on the unit sphere are at most 2, so
an answer no training question had (or a vocabulary of one answer) counts as 2 away. The
calibration (`vqa.calibration`) turns (temperature-scaled confidence, trust) into the probability
that the answer is right with a logistic fit per branch on validation. Stored in the bundle as
`trust.safetensors`: the training questions' fused vectors (float16) and their answer ids.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import DataError
from .io import atomic_write_safetensors

TRUST_FILE = "trust.safetensors"
MAX_TRUST_ROWS = 50_000  # 50k x 256 float16 = 25 MB in the bundle; beyond, a fixed random subset
_FAR = 2.0  # the unit sphere's diameter: the distance of an answer no training question had
_EPS = 1e-4  # two identical questions: a finite ratio
_CHUNK = 1024  # test questions scored at once (a chunk x rows distance matrix)


@dataclass
class TrustScorer:
    features: torch.Tensor  # (N, F) training questions' fused vectors, L2-normalised, float32 in memory
    answers: torch.Tensor  # (N,) their answer ids

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
    def fit(cls, fused: torch.Tensor, answers: torch.Tensor, max_rows: int = MAX_TRUST_ROWS,
            seed: int = 0) -> "TrustScorer":
        """From the training questions' fused vectors (N, F) and answer ids (N,); ids < 0 (answers outside the
        vocabulary) are left out, and beyond `max_rows` a fixed random subset is kept."""
        keep = answers >= 0
        fused, answers = fused[keep].float(), answers[keep].long()
        if len(fused) > max_rows:
            pick = torch.randperm(len(fused), generator=torch.Generator().manual_seed(seed))[:max_rows].sort().values
            fused, answers = fused[pick], answers[pick]
        # rounded as `save` stores them: the calibration fitted on this memory is the one a loaded bundle applies
        return cls(torch.nn.functional.normalize(fused, dim=1).half().float(), answers)

    def save(self, folder: Path) -> None:
        atomic_write_safetensors(Path(folder) / TRUST_FILE, {
            "features": self.features.half().contiguous(), "answers": self.answers.to(torch.int32).contiguous()},
            metadata={"format": "pt"})

    @classmethod
    def load(cls, folder: Path) -> "TrustScorer | None":
        path = Path(folder) / TRUST_FILE
        if not path.is_file():
            return None
        try:
            t = load_file(str(path))
            features, answers = t["features"].float(), t["answers"].long()
        except (SafetensorError, OSError, KeyError) as e:
            raise DataError(f"{path}: not a readable trust-score memory ({e})") from None
        if features.dim() != 2 or answers.shape != (features.shape[0],):
            raise DataError(f"{path}: expected features (N, F) and answers (N,), got {tuple(features.shape)} and "
                            f"{tuple(answers.shape)}")
        return cls(features, answers)
