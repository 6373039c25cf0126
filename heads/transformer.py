"""Cross-modal transformer fusion (the M3AE / PMC-CLIP VQA family) and the heads built on it.

Two streams, image regions and question tokens, each projected to one width with a
learned position and modality embedding. Every layer runs, in each stream, self-attention,
cross-attention to the other stream, and a feed-forward block (pre-norm residuals), as
M3AE's co-attention layers do. A learned [FUSE] token leads the question stream; the
fused vector is its final state concatenated with the mean of the final image tokens.
The attention shown to users is the last layer's question-to-image cross-attention from
the [FUSE] token, averaged over heads: (B, N), summing to 1.

Heads: `fusion-transformer` (answers from the vocabulary), `fusion-transformer-qcr`
(QCR's closed/open router, each type its own answer classifier) and
`fusion-transformer-mc` (multiple choice: each choice, encoded by the question encoder,
scored against the fused vector).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

from ._registry import register_head
from .base import CLOSED, VQAHead
from .layers import MASKED_LOGIT, WordAttentionPool
from .losses import AnswerLoss, MultipleChoiceLoss, QCRLoss


@dataclass
class TransformerHeadConfig:
    hidden_dim: int = 256  # the width of both streams
    layers: int = 2
    attention_heads: int = 4
    ff_mult: int = 4
    dropout: float = 0.1
    classifier_dropout: float = 0.1
    max_regions: int = 1024  # learned positions for image regions (ViT-B/16's 196 fit)
    max_tokens: int = 128  # learned positions for question tokens


@dataclass
class RoutedTransformerHeadConfig(TransformerHeadConfig):
    # which answers each branch may give (length A); vqa.answers.AnswerVocab.type_mask builds them
    closed_mask: list[bool] = field(default_factory=list)
    open_mask: list[bool] = field(default_factory=list)
    type_hidden: int = 64

    def __post_init__(self) -> None:
        self.closed_mask = [bool(x) for x in list(self.closed_mask)]
        self.open_mask = [bool(x) for x in list(self.open_mask)]


class _Block(nn.Module):
    """Pre-norm self-attention, cross-attention to the other stream, feed-forward, for one stream."""

    def __init__(self, dim: int, heads: int, ff_mult: int, dropout: float) -> None:
        super().__init__()
        self.norm_self, self.norm_cross, self.norm_ff = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Dropout(dropout),
                                nn.Linear(ff_mult * dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, x_pad: torch.Tensor | None, other: torch.Tensor,
                other_pad: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.norm_self(x)
        x = x + self.dropout(self.self_attn(h, h, h, key_padding_mask=x_pad, need_weights=False)[0])
        h = self.norm_cross(x)
        attended, weights = self.cross_attn(h, other, other, key_padding_mask=other_pad, need_weights=True,
                                            average_attn_weights=True)  # weights (B, Lx, Lother)
        x = x + self.dropout(attended)
        return x + self.dropout(self.ff(self.norm_ff(x))), weights


class TransformerFusion(nn.Module):
    """Image regions (B, N, Dv) and question tokens (B, L, Dq) -> {"fused": (B, 2H), "tokens": (B, L+1, H),
    "attention": (B, N)}."""

    def __init__(self, v_dim: int, q_dim: int, config: TransformerHeadConfig) -> None:
        super().__init__()
        h = config.hidden_dim
        self.config = config
        self.v_in, self.q_in = nn.Linear(v_dim, h), nn.Linear(q_dim, h)
        self.v_pos = nn.Parameter(torch.zeros(config.max_regions, h))
        self.q_pos = nn.Parameter(torch.zeros(config.max_tokens + 1, h))
        self.modality = nn.Parameter(torch.zeros(2, h))  # 0: image, 1: question
        self.fuse_token = nn.Parameter(torch.zeros(1, 1, h))
        for p in (self.v_pos, self.q_pos, self.modality, self.fuse_token):
            nn.init.normal_(p, std=0.02)
        args = (h, config.attention_heads, config.ff_mult, config.dropout)
        self.v_blocks = nn.ModuleList(_Block(*args) for _ in range(config.layers))
        self.q_blocks = nn.ModuleList(_Block(*args) for _ in range(config.layers))
        self.v_norm, self.q_norm = nn.LayerNorm(h), nn.LayerNorm(h)
        self.out_dim = 2 * h

    def forward(self, v: torch.Tensor, q_tokens: torch.Tensor, q_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        b, n, _ = v.shape
        if n > self.v_pos.shape[0] or q_tokens.shape[1] + 1 > self.q_pos.shape[0]:
            raise ValueError(f"fusion-transformer: {n} regions / {q_tokens.shape[1]} tokens exceed max_regions="
                             f"{self.v_pos.shape[0]} / max_tokens={self.q_pos.shape[0] - 1}")
        x_v = self.v_in(v) + self.v_pos[:n] + self.modality[0]  # (B, N, H)
        q = self.q_in(q_tokens)  # (B, L, H)
        x_q = torch.cat([self.fuse_token.expand(b, -1, -1), q], dim=1)  # (B, L+1, H)
        x_q = x_q + self.q_pos[:x_q.shape[1]] + self.modality[1]
        q_pad = ~torch.cat([q_mask.new_ones(b, 1), q_mask], dim=1)  # (B, L+1), True at padding
        weights = None
        for v_block, q_block in zip(self.v_blocks, self.q_blocks):  # both streams read the previous layer's
            new_v, _ = v_block(x_v, None, x_q, q_pad)
            x_q, weights = q_block(x_q, q_pad, x_v, None)
            x_v = new_v
        x_v, x_q = self.v_norm(x_v), self.q_norm(x_q)
        fused = torch.cat([x_q[:, 0], x_v.mean(1)], dim=-1)  # (B, 2H)
        attention = weights[:, 0].float()  # (B, N): the [FUSE] token's look at the image, last layer
        return {"fused": fused, "tokens": x_q, "attention": attention / attention.sum(-1, keepdim=True)}


def _classifier(in_dim: int, out_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(in_dim, out_dim))


@register_head("fusion-transformer")
class FusionTransformerHead(VQAHead):
    """Cross-modal transformer + answer classifier: `{"logits": (B, A), "attention": (B, N), "fused": (B, F)}`."""

    config_class = TransformerHeadConfig
    loss_class = AnswerLoss
    has_fused_output = True
    default_loss = "ce"

    def __init__(self, config: TransformerHeadConfig, **kw) -> None:
        super().__init__(config, **kw)
        self.fusion = TransformerFusion(self.feature_dim, self.question_dim, config)
        self.classifier = _classifier(self.fusion.out_dim, self.num_answers, config.classifier_dropout)

    def forward(self, features: Mapping[str, torch.Tensor], question_tokens: torch.Tensor,
                lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        question, mask = self.encode_question(question_tokens, lengths)
        fused = self.fusion(self.grid(features), question["tokens"], mask)
        return {"logits": self.classifier(fused["fused"]), "attention": fused["attention"],  # (B, A), (B, N)
                "fused": fused["fused"]}


class _GroupClassifier(nn.Module):
    """A classifier over one answer group, scattered into the full vocabulary (MASKED_LOGIT elsewhere)."""

    def __init__(self, in_dim: int, group: list[bool], dropout: float) -> None:
        super().__init__()
        self.register_buffer("index", torch.tensor([i for i, g in enumerate(group) if g]), persistent=False)
        self.num_answers = len(group)
        self.classifier = _classifier(in_dim, len(self.index), dropout)

    def forward(self, fused: torch.Tensor) -> torch.Tensor:
        full = fused.new_full((fused.shape[0], self.num_answers), MASKED_LOGIT)
        return full.index_copy(1, self.index, self.classifier(fused).to(full.dtype))  # (B, A)


@register_head("fusion-transformer-qcr")
class RoutedFusionTransformerHead(VQAHead):
    """Cross-modal transformer + QCR's type router: a closed/open classifier on the question alone sends each
    question to its type's answer classifier. Outputs as the `qcr` head: logits, closed_logits, open_logits,
    type_logits, attention, fused (the one vector both classifiers read)."""

    config_class = RoutedTransformerHeadConfig
    has_type_router = True
    needs_answer_groups = True
    loss_class = QCRLoss
    has_fused_output = True
    default_loss = "ce"

    def __init__(self, config: RoutedTransformerHeadConfig, **kw) -> None:
        super().__init__(config, **kw)
        for name, group in (("closed_mask", config.closed_mask), ("open_mask", config.open_mask)):
            if len(group) != self.num_answers or not any(group):
                raise ValueError(f"fusion-transformer-qcr: {name} needs {self.num_answers} entries, some true")
        self.fusion = TransformerFusion(self.feature_dim, self.question_dim, config)
        self.closed = _GroupClassifier(self.fusion.out_dim, config.closed_mask, config.classifier_dropout)
        self.open = _GroupClassifier(self.fusion.out_dim, config.open_mask, config.classifier_dropout)
        self.type_pool = WordAttentionPool(self.question_dim)
        self.type_classifier = nn.Sequential(nn.Linear(self.question_dim, config.type_hidden), nn.ReLU(),
                                             nn.Dropout(config.classifier_dropout), nn.Linear(config.type_hidden, 2))

    def forward(self, features: Mapping[str, torch.Tensor], question_tokens: torch.Tensor,
                lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        question, mask = self.encode_question(question_tokens, lengths)
        fused = self.fusion(self.grid(features), question["tokens"], mask)
        type_logits = self.type_classifier(self.type_pool(question["tokens"], mask))  # (B, 2)
        closed, opened = self.closed(fused["fused"]), self.open(fused["fused"])  # (B, A) each
        is_closed = (type_logits.argmax(-1) == CLOSED).unsqueeze(-1)
        return {"logits": torch.where(is_closed, closed, opened), "closed_logits": closed, "open_logits": opened,
                "type_logits": type_logits, "attention": fused["attention"], "fused": fused["fused"]}


@register_head("fusion-transformer-mc")
class MultipleChoiceTransformerHead(VQAHead):
    """Cross-modal transformer for multiple choice: each choice (encoded by the question encoder) is scored by
    a learnt inner product with the fused vector; absent choices (length 0) are masked.
    `{"logits": (B, C), "attention": (B, N)}`."""

    config_class = TransformerHeadConfig
    needs_choices = True
    loss_class = MultipleChoiceLoss
    supported_losses = ("ce",)
    default_loss = "ce"

    def __init__(self, config: TransformerHeadConfig, **kw) -> None:
        super().__init__(config, **kw)
        h = config.hidden_dim
        self.fusion = TransformerFusion(self.feature_dim, self.question_dim, config)
        self.fused_proj = nn.Linear(self.fusion.out_dim, h)
        self.choice_proj = nn.Linear(self.question_dim, h)
        self.score = nn.Sequential(nn.Dropout(config.classifier_dropout), nn.Linear(h, 1))

    def forward(self, features: Mapping[str, torch.Tensor], question_tokens: torch.Tensor, lengths: torch.Tensor,
                *, choice_tokens: torch.Tensor, choice_lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        question, mask = self.encode_question(question_tokens, lengths)
        fused = self.fusion(self.grid(features), question["tokens"], mask)
        batch, choices, choice_len = choice_tokens.shape
        encoded, _ = self.encode_question(choice_tokens.reshape(-1, choice_len), choice_lengths.reshape(-1))
        choice_vec = self.choice_proj(encoded["pooled"]).view(batch, choices, -1)  # (B, C, H)
        joint = torch.tanh(self.fused_proj(fused["fused"])).unsqueeze(1) * choice_vec  # (B, C, H)
        logits = self.score(joint).squeeze(-1).masked_fill(choice_lengths <= 0, MASKED_LOGIT)  # (B, C)
        return {"logits": logits, "attention": fused["attention"]}
