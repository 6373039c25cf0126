"""Losses for the heads, as their own modules (the trainer combines head and loss).

Every loss is called as `loss(outputs, targets, answer_type=None)` where
`outputs` is the head's output dict, and returns `{"loss": total, ...parts}`.
A loss that `reads_batch_types` also takes `batch_types`: the answer types of
the global batch that a DDP rank's batch is part of (see `QCRLoss`).

Targets: either answer indices (B,) long (-100 = no answer in the vocabulary,
ignored) or soft scores (B, A) float (one-hot, or VQA-style soft scores).
`answer_type` is (B,) long, 0 = CLOSED, 1 = OPEN (`heads.CLOSED`, `heads.OPEN`).
Losses are computed in float32 whatever the autocast dtype of the logits.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import OPEN, VQAHead

IGNORE_INDEX = -100
# bce: per-answer BCE summed over answers, averaged over questions (MEVF); bce-mean: averaged over every (question,
# answer) pair, PyTorch's default reduction, as QCR's code trains (per answer branch); ce: softmax cross-entropy.
# Adamax is blind to the loss's scale but gradient clipping is not: under MEVF's sum, a 0.25 clip acts at every step.
LOSS_KINDS = ("bce", "bce-mean", "ce")


def soft_targets(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B,) indices (IGNORE_INDEX -> all-zero row) or (B, A) scores -> (B, A) float32 scores."""
    if targets.dim() == 2:
        if targets.shape[1] != num_classes:
            raise ValueError(f"soft targets have {targets.shape[1]} columns, expected {num_classes}")
        return targets.float()
    if targets.dim() != 1 or targets.dtype.is_floating_point:
        raise ValueError(f"targets must be (B,) answer indices or (B, {num_classes}) scores, got {tuple(targets.shape)} {targets.dtype}")
    valid = targets >= 0
    one_hot = F.one_hot(targets.clamp(min=0), num_classes).float()
    return one_hot * valid.unsqueeze(1)


def _bce(logits: torch.Tensor, scores: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """MEVF's scaling: BCE summed over answers (those in `keep`), averaged over the batch."""
    per_answer = F.binary_cross_entropy_with_logits(logits, scores, reduction="none")  # (B, A)
    if keep is not None:
        per_answer = per_answer * keep
    return per_answer.sum() / max(logits.shape[0], 1)


def _mean_over_pairs(per_answer: torch.Tensor, rows: torch.Tensor, keep: torch.Tensor,
                     questions: torch.Tensor) -> torch.Tensor:
    """`per_answer` (B, A) summed over the (question, answer) pairs of `rows` (B,) and the answers in `keep` (A,),
    divided by the pairs of `questions` such questions (0 when there are none)."""
    pairs = rows.float().unsqueeze(1) * keep.float()  # (B, A)
    return (per_answer * pairs).sum() / (questions * keep.float().sum()).clamp_min(1.0)  # tensor counts: no host sync


def _soft_cross_entropy(logits: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against scores renormalised per row; rows with no target are skipped."""
    # Weighted over all rows rather than indexed by `mass > 0`: selecting rows, or asking whether any has a
    # target, would read a GPU tensor back to the host each step. A batch without targets gives 0, graph intact.
    mass = scores.sum(1)
    rows = (mass > 0).to(logits.dtype)
    probs = scores / mass.clamp_min(torch.finfo(scores.dtype).tiny).unsqueeze(1)
    log_probs = F.log_softmax(logits, dim=1)
    # Masked-out answers have -inf log-probability and zero target mass: count them as 0, not NaN.
    per_row = -(probs * log_probs.masked_fill(probs == 0, 0.0)).sum(1)
    return (per_row * rows).sum() / rows.sum().clamp_min(1.0)


class AnswerLoss(nn.Module):
    """Answer classification over the vocabulary, on `outputs["logits"]` (B, A).

    kind="bce" (MEVF): binary cross-entropy with logits against one-hot / soft
    scores, summed over answers and averaged over the batch, as MEVF trains.
    kind="bce-mean": the same averaged over every (question, answer) pair.
    kind="ce": softmax cross-entropy (soft targets renormalised per row).
    """

    reads_batch_types = False  # a mean over this batch's own questions (see the module's note)

    def __init__(self, kind: str = "bce") -> None:
        super().__init__()
        if kind not in LOSS_KINDS:
            raise ValueError(f"kind must be one of {LOSS_KINDS}, got {kind!r}")
        self.kind = kind

    @classmethod
    def from_head(cls, head: VQAHead, kind: str = "bce") -> "AnswerLoss":
        return cls(kind)

    def forward(
        self, outputs: Mapping[str, torch.Tensor], targets: torch.Tensor, answer_type: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        logits = outputs["logits"].float()  # (B, A)
        scores = soft_targets(targets, logits.shape[1])  # (B, A)
        if self.kind == "bce":
            loss = _bce(logits, scores)
        elif self.kind == "bce-mean":
            loss = F.binary_cross_entropy_with_logits(logits, scores)
        else:
            loss = _soft_cross_entropy(logits, scores)
        return {"loss": loss, "answer_loss": loss}


class QCRLoss(nn.Module):
    """QCR training loss: answer loss on the branch of each sample's true type + type loss.

    A closed question is scored by `closed_logits` over the closed group only,
    an open one by `open_logits` over the open group (the ground-truth type picks
    the branch, as QCR trains). Target mass outside the sample's group is
    dropped. total = answer_loss + type_weight * cross_entropy(type_logits, answer_type).
    kind="bce-mean" (QCR's code): each branch's BCE averaged over its questions' (question, answer-of-the-group)
    pairs, the two branches' averages added. Those means are over the global batch when a DDP rank passes its
    `batch_types` (each rank's own counts would weigh a question by its rank's mix of types), scaled as a mean
    over the rank's own questions, so that the engine's share rule makes DDP's average one process's loss.
    """

    def __init__(
        self, closed_mask: Sequence[bool], open_mask: Sequence[bool], type_weight: float = 1.0, kind: str = "bce"
    ) -> None:
        super().__init__()
        if kind not in LOSS_KINDS:
            raise ValueError(f"kind must be one of {LOSS_KINDS}, got {kind!r}")
        self.kind = kind
        self.type_weight = type_weight
        self.register_buffer("closed_mask", torch.as_tensor(list(closed_mask), dtype=torch.bool), persistent=False)
        self.register_buffer("open_mask", torch.as_tensor(list(open_mask), dtype=torch.bool), persistent=False)

    @classmethod
    def from_head(cls, head: VQAHead, **kw) -> "QCRLoss":
        return cls(head.config.closed_mask, head.config.open_mask, **kw)

    @property
    def reads_batch_types(self) -> bool:
        return self.kind == "bce-mean"

    def forward(
        self, outputs: Mapping[str, torch.Tensor], targets: torch.Tensor, answer_type: torch.Tensor | None = None,
        batch_types: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        if answer_type is None:
            raise ValueError("QCRLoss needs answer_type (B,) with 0 = CLOSED, 1 = OPEN")
        is_open = (answer_type == OPEN).unsqueeze(1)  # (B, 1)
        logits = torch.where(is_open, outputs["open_logits"], outputs["closed_logits"]).float()  # (B, A)
        group = torch.where(is_open, self.open_mask, self.closed_mask)  # (B, A)
        scores = soft_targets(targets, logits.shape[1]) * group  # (B, A)
        if self.kind == "bce":
            answer_loss = _bce(logits, scores, keep=group)
        elif self.kind == "bce-mean":
            per_answer = F.binary_cross_entropy_with_logits(logits, scores, reduction="none")  # (B, A)
            open_rows = is_open.squeeze(1)
            whole = answer_type if batch_types is None else batch_types
            n_open = (whole == OPEN).sum()
            answer_loss = (_mean_over_pairs(per_answer, ~open_rows, self.closed_mask, whole.numel() - n_open)
                           + _mean_over_pairs(per_answer, open_rows, self.open_mask, n_open))
            answer_loss = answer_loss * (whole.numel() / max(answer_type.numel(), 1))
        else:
            answer_loss = _soft_cross_entropy(logits.masked_fill(~group, float("-inf")), scores)
        type_loss = F.cross_entropy(outputs["type_logits"].float(), answer_type.long())
        total = answer_loss + self.type_weight * type_loss
        return {"loss": total, "answer_loss": answer_loss, "type_loss": type_loss}


class MultipleChoiceLoss(nn.Module):
    """Cross-entropy over the choices of `outputs["logits"]` (B, C); targets (B,) choice indices."""

    reads_batch_types = False  # a mean over this batch's own questions (see the module's note)

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    @classmethod
    def from_head(cls, head: VQAHead, kind: str = "ce", **kw) -> "MultipleChoiceLoss":
        if kind != "ce":
            raise ValueError(f"a multiple-choice head trains with softmax cross-entropy over its choices, not {kind!r}")
        return cls(**kw)

    def forward(
        self, outputs: Mapping[str, torch.Tensor], targets: torch.Tensor, answer_type: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        logits = outputs["logits"].float()  # (B, C)
        if not (targets >= 0).any():
            loss = logits.sum() * 0.0
        else:
            loss = F.cross_entropy(logits, targets.long(), ignore_index=IGNORE_INDEX, label_smoothing=self.label_smoothing)
        return {"loss": loss, "choice_loss": loss}


def loss_for_head(head: VQAHead, kind: str | None = None, **kw) -> nn.Module:
    """The loss that trains `head` (its declared `loss_class`), of `kind` (default: the head's `default_loss`)."""
    kind = kind or head.default_loss
    if head.loss_class is None:
        raise ValueError(f"head {head.name!r} declares no loss_class")
    if kind not in head.supported_losses:
        raise ValueError(f"head {head.name!r} trains with {' or '.join(head.supported_losses)}, not {kind!r}")
    return head.loss_class.from_head(head, kind=kind, **kw)
