"""Multiple-choice head for PMC-VQA: score each candidate answer against the image–question vector."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from ._registry import register_head
from .base import VQAHead
from .layers import MASKED_LOGIT, FCNet, wn_linear
from .losses import MultipleChoiceLoss
from .mevf import BANHeadConfig, build_ban


@dataclass
class MultipleChoiceHeadConfig(BANHeadConfig):
    """BAN fields, plus the dropout of the choice scorer (reuses `classifier_dropout`)."""


@register_head("mc-ban")
class MultipleChoiceBANHead(VQAHead):
    """BAN fuses image and question; each choice, encoded by the same question
    encoder, is scored by a learnt weighted inner product with the fused vector.

    `forward(features, question_tokens, lengths, *, choice_tokens (B, C, Lc),
    choice_lengths (B, C))` -> `{"logits": (B, C), "attention": (B, N)}`.
    A choice with length 0 is absent (fewer than C choices): its logit is masked.
    Scoring is symmetric in the choices, so their order carries no information.
    """

    config_class = MultipleChoiceHeadConfig
    needs_choices = True
    loss_class = MultipleChoiceLoss
    supported_losses = ("ce",)
    default_loss = "ce"

    def __init__(self, config: MultipleChoiceHeadConfig, **kw) -> None:
        super().__init__(config, **kw)
        h = config.hidden_dim
        self.fusion = build_ban(config, self.feature_dim, self.question_dim)
        self.fused_proj = FCNet([h, h], dropout=config.dropout)
        self.choice_proj = FCNet([self.question_dim, h], dropout=config.dropout)
        self.score_dropout = nn.Dropout(config.classifier_dropout)
        self.score = wn_linear(h, 1)

    def forward(
        self,
        features: Mapping[str, torch.Tensor],
        question_tokens: torch.Tensor,
        lengths: torch.Tensor,
        *,
        choice_tokens: torch.Tensor,
        choice_lengths: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        question, mask = self.encode_question(question_tokens, lengths)
        fused = self.fusion(self.grid(features), question["tokens"], mask)
        batch, choices, choice_len = choice_tokens.shape
        # All choices of the batch go through the encoder as one (B*C, Lc) batch.
        encoded, _ = self.encode_question(choice_tokens.reshape(-1, choice_len), choice_lengths.reshape(-1))
        choice_vec = self.choice_proj(encoded["pooled"]).view(batch, choices, -1)  # (B, C, H)
        joint = self.fused_proj(fused["fused"]).unsqueeze(1) * choice_vec  # (B, C, H)
        logits = self.score(self.score_dropout(joint)).squeeze(-1)  # (B, C)
        logits = logits.masked_fill(choice_lengths <= 0, MASKED_LOGIT)
        return {"logits": logits, "attention": fused["attention"]}  # (B, C), (B, N)
