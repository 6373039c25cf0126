"""MEVF heads (Nguyen et al., MICCAI 2019): question GRU + BAN or SAN fusion + answer MLP.

MEVF's own image side (MAML CNN + denoising autoencoder) is an encoder in
`encoders/`; here the image arrives as precomputed features, as in PubMedCLIP.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from ._registry import register_head
from .base import VQAHead
from .fusion import BilinearAttentionFusion, StackedAttentionFusion
from .layers import AnswerClassifier
from .losses import AnswerLoss


@dataclass
class BANHeadConfig:
    hidden_dim: int = 1024  # MEVF's num_hid
    glimpses: int = 2  # MEVF's gamma
    k: int = 3  # rank multiplier of the attention's bilinear form (BAN)
    dropout: float = 0.2  # inside the bilinear layers
    attention_dropout: float = 0.5  # on the image side of the attention logits
    classifier_dropout: float = 0.5


@dataclass
class SANHeadConfig:
    hidden_dim: int = 1024
    hops: int = 2  # MEVF's num_stacks
    dropout: float = 0.5  # on the attention hidden layer
    classifier_dropout: float = 0.5


def build_ban(config: BANHeadConfig, feature_dim: int, question_dim: int) -> BilinearAttentionFusion:
    return BilinearAttentionFusion(
        feature_dim,
        question_dim,
        hidden_dim=config.hidden_dim,
        glimpses=config.glimpses,
        k=config.k,
        dropout=config.dropout,
        attention_dropout=config.attention_dropout,
    )


@register_head("mevf-ban")
class MEVFBANHead(VQAHead):
    """Bilinear attention over (region, word) pairs; returns `{"logits": (B, A), "attention": (B, N), "fused": (B, F)}`."""

    config_class = BANHeadConfig
    loss_class = AnswerLoss
    has_fused_output = True

    def __init__(self, config: BANHeadConfig, **kw) -> None:
        super().__init__(config, **kw)
        self.fusion = build_ban(config, self.feature_dim, self.question_dim)
        self.classifier = AnswerClassifier(
            config.hidden_dim, 2 * config.hidden_dim, self.num_answers, config.classifier_dropout
        )

    def forward(
        self, features: Mapping[str, torch.Tensor], question_tokens: torch.Tensor, lengths: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        question, mask = self.encode_question(question_tokens, lengths)
        fused = self.fusion(self.grid(features), question["tokens"], mask)
        return {"logits": self.classifier(fused["fused"]), "attention": fused["attention"],  # (B, A), (B, N)
                "fused": fused["fused"]}


@register_head("mevf-san")
class MEVFSANHead(VQAHead):
    """Stacked attention from the pooled question; returns `{"logits": (B, A), "attention": (B, N), "fused": (B, F)}`."""

    config_class = SANHeadConfig
    loss_class = AnswerLoss
    has_fused_output = True

    def __init__(self, config: SANHeadConfig, **kw) -> None:
        super().__init__(config, **kw)
        self.fusion = StackedAttentionFusion(
            self.feature_dim, self.question_dim, config.hidden_dim, hops=config.hops, dropout=config.dropout
        )
        self.classifier = AnswerClassifier(
            config.hidden_dim, 2 * config.hidden_dim, self.num_answers, config.classifier_dropout
        )

    def forward(
        self, features: Mapping[str, torch.Tensor], question_tokens: torch.Tensor, lengths: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        question, _ = self.encode_question(question_tokens, lengths)
        fused = self.fusion(self.grid(features), question["pooled"])
        return {"logits": self.classifier(fused["fused"]), "attention": fused["attention"],  # (B, A), (B, N)
                "fused": fused["fused"]}
