"""QCR head: "Medical VQA via Conditional Reasoning" (Zhan et al., ACM MM 2020).

On top of BAN it adds
- a question-conditioned reasoning module: a vector computed from the question
  alone (word self-attention + MLP) that reweights the fused image–question
  feature channel by channel, so the same fusion serves "is there ...?" and
  "which organ ...?" reasoning differently;
- a question-type classifier (CLOSED / OPEN, from the question alone) and two
  answer branches, each with its own bilinear attention and classifier over its
  own answer group; each question is routed to the branch of its predicted type.

Unlike QCR's code, both branches run on every sample (no batch splitting), so
shapes are static and every parameter gets a gradient (DDP-friendly); routing
is a `torch.where` on the type prediction.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import nn

from ._registry import register_head
from .base import CLOSED, VQAHead
from .layers import MASKED_LOGIT, AnswerClassifier, WordAttentionPool
from .losses import QCRLoss
from .mevf import BANHeadConfig, build_ban

logger = logging.getLogger(__name__)


@dataclass
class QCRHeadConfig:
    # Which answers each branch may give (length A, 1/True = in the group); an
    # answer may be in both. vqa.answers.AnswerVocab.type_mask builds them from the train split.
    closed_mask: list[bool]
    open_mask: list[bool]
    hidden_dim: int = 1024
    glimpses: int = 2
    k: int = 3
    dropout: float = 0.2
    attention_dropout: float = 0.5
    classifier_dropout: float = 0.5
    type_hidden: list[int] = field(default_factory=lambda: [256, 64])  # QCR's type MLP: H -> 256 -> 64 -> 2
    # True: the type router's loss stops at the question features, training the router alone, as QCR's code
    # trains its type classifier apart from the answer model; False: it trains the shared question encoder too.
    separate_router: bool = False

    def __post_init__(self) -> None:
        # Plain bools whatever came in (tensor, numpy, 0/1), so the config stays JSON.
        self.closed_mask = [bool(x) for x in list(self.closed_mask)]
        self.open_mask = [bool(x) for x in list(self.open_mask)]
        self.type_hidden = [int(x) for x in self.type_hidden]
        if not isinstance(self.separate_router, bool):  # `--head-arg separate_router=yes` would read as true
            raise ValueError(f"qcr: separate_router must be true or false, got {self.separate_router!r}")

    def ban(self) -> BANHeadConfig:
        return BANHeadConfig(
            hidden_dim=self.hidden_dim, glimpses=self.glimpses, k=self.k, dropout=self.dropout,
            attention_dropout=self.attention_dropout, classifier_dropout=self.classifier_dropout,
        )


def _mlp(dims: Sequence[int], dropout: float) -> nn.Sequential:
    """Linear/ReLU stack ending in a plain Linear; dropout before the last layer."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        if i == len(dims) - 2:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class _AnswerBranch(nn.Module):
    """BAN + classifier over one answer group, scattered back into the full answer vocabulary."""

    def __init__(self, config: BANHeadConfig, feature_dim: int, question_dim: int, group: list[bool]) -> None:
        super().__init__()
        self.fusion = build_ban(config, feature_dim, question_dim)
        self.register_buffer("index", torch.tensor([i for i, g in enumerate(group) if g]), persistent=False)
        self.num_answers = len(group)
        self.classifier = AnswerClassifier(
            config.hidden_dim, 2 * config.hidden_dim, len(self.index), config.classifier_dropout
        )

    def forward(
        self, v: torch.Tensor, q_tokens: torch.Tensor, q_mask: torch.Tensor, reasoning: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fused = self.fusion(v, q_tokens, q_mask)
        conditioned = fused["fused"] * reasoning  # (B, H): what the branch's classifier reads
        group_logits = self.classifier(conditioned)  # (B, A_group)
        full = group_logits.new_full((v.shape[0], self.num_answers), MASKED_LOGIT)
        return full.index_copy(1, self.index, group_logits), fused["attention"], conditioned  # (B, A), (B, N), (B, H)


@register_head("qcr")
class QCRHead(VQAHead):
    """BAN + conditional reasoning + type router.

    Returns `{"logits": (B, A), "closed_logits": (B, A), "open_logits": (B, A),
    "type_logits": (B, 2), "attention": (B, N), "fused": (B, H)}`. Branch logits are
    `MASKED_LOGIT` outside their group; `logits`, `attention` and `fused` come from the
    branch of the predicted type (`type_logits` index 0 = CLOSED, 1 = OPEN).
    """

    config_class = QCRHeadConfig
    has_type_router = True
    needs_answer_groups = True
    loss_class = QCRLoss
    has_fused_output = True

    def __init__(self, config: QCRHeadConfig, **kw) -> None:
        super().__init__(config, **kw)
        for name, group in (("closed_mask", config.closed_mask), ("open_mask", config.open_mask)):
            if len(group) != self.num_answers:
                raise ValueError(f"qcr: {name} has {len(group)} entries, expected {self.num_answers} (one per answer)")
            if not any(group):
                raise ValueError(f"qcr: {name} selects no answer")
        orphans = sum(not (c or o) for c, o in zip(config.closed_mask, config.open_mask))
        if orphans:
            logger.warning("qcr: %d answers are in neither the closed nor the open group and can never be predicted", orphans)
        ban, q_dim, h = config.ban(), self.question_dim, config.hidden_dim
        self.closed_branch = _AnswerBranch(ban, self.feature_dim, q_dim, config.closed_mask)
        self.open_branch = _AnswerBranch(ban, self.feature_dim, q_dim, config.open_mask)
        self.reasoning_pool = WordAttentionPool(q_dim)
        self.reasoning = _mlp([q_dim, 2 * h, h, h], config.classifier_dropout)  # QCR: 1024 -> 2048 -> 1024 -> 1024
        self.type_pool = WordAttentionPool(q_dim)
        self.type_classifier = _mlp([q_dim, *config.type_hidden, 2], config.classifier_dropout)

    def forward(
        self, features: Mapping[str, torch.Tensor], question_tokens: torch.Tensor, lengths: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        question, mask = self.encode_question(question_tokens, lengths)
        words = question["tokens"]  # (B, L, Hq)
        v = self.grid(features)  # (B, N, D)
        reasoning = self.reasoning(self.reasoning_pool(words, mask))  # (B, H)
        routed = words.detach() if self.config.separate_router else words
        type_logits = self.type_classifier(self.type_pool(routed, mask))  # (B, 2)
        closed_logits, closed_att, closed_fused = self.closed_branch(v, words, mask, reasoning)
        open_logits, open_att, open_fused = self.open_branch(v, words, mask, reasoning)
        is_closed = (type_logits.argmax(-1) == CLOSED).unsqueeze(-1)  # (B, 1)
        return {
            "logits": torch.where(is_closed, closed_logits, open_logits),
            "closed_logits": closed_logits,
            "open_logits": open_logits,
            "type_logits": type_logits,
            "attention": torch.where(is_closed, closed_att, open_att),
            "fused": torch.where(is_closed, closed_fused, open_fused),
        }
