"""The head interface every registered head follows, and question-encoder (re)building."""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from .hf_text import HFTextEncoderConfig, HFTextQuestionEncoder
from .layers import length_mask
from .question import QuestionEncoder, QuestionEncoderConfig

# Index of each answer type in `type_logits` and in the `answer_type` targets of the losses.
CLOSED, OPEN = 0, 1
ANSWER_TYPES = ("CLOSED", "OPEN")


class VQAHead(nn.Module):
    """A question encoder + fusion + answer scorer over precomputed image features.

    `forward(features, question_tokens, lengths) -> dict` where `features` is an
    encoder's `{"grid": (B, N, D), "pooled": (B, D)}`, `question_tokens` (B, L)
    are right-padded ids and `lengths` (B,) their valid counts. Output keys are
    fixed per head (see each head's docstring); the loss lives in `heads.losses`.
    """

    name: ClassVar[str] = ""  # set by @register_head
    config_class: ClassVar[type]
    needs_choices: ClassVar[bool] = False  # forward also takes choice_tokens / choice_lengths

    def __init__(
        self, config: Any, *, feature_dim: int, vocab_sizes: Mapping[str, int], question_encoder: nn.Module
    ) -> None:
        super().__init__()
        self.config = config
        self.feature_dim = feature_dim
        self.vocab_sizes = dict(vocab_sizes)
        self.num_answers = int(vocab_sizes["answers"])
        self.question_encoder = question_encoder
        self.question_dim = int(question_encoder.output_dim)

    def encode_question(
        self, tokens: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The encoder's `{"tokens", "pooled"}` and the (B, L) mask of valid words."""
        lengths = lengths.clamp(1, tokens.shape[1])
        return self.question_encoder(tokens, lengths), length_mask(lengths, tokens.shape[1])

    def grid(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The (B, N, D) region features, checked against `feature_dim`."""
        grid = features["grid"]
        if grid.dim() != 3 or grid.shape[-1] != self.feature_dim:
            raise ValueError(f"{self.name}: expected grid features (B, N, {self.feature_dim}), got {tuple(grid.shape)}")
        return grid


def create_question_encoder(encoder: nn.Module | Any) -> nn.Module:
    """A question encoder from a module (returned as is), a config dataclass, or a spec dict."""
    if isinstance(encoder, nn.Module):
        if not hasattr(encoder, "output_dim"):
            raise ValueError(f"question encoder {type(encoder).__name__} has no `output_dim`")
        return encoder
    if isinstance(encoder, QuestionEncoderConfig):
        return QuestionEncoder(encoder)
    if isinstance(encoder, HFTextEncoderConfig):
        return HFTextQuestionEncoder.from_config(encoder)
    if isinstance(encoder, Mapping) and encoder.get("type") == "rnn":
        return QuestionEncoder(QuestionEncoderConfig(**encoder["config"]))
    if isinstance(encoder, Mapping) and encoder.get("type") == "hf":
        return HFTextQuestionEncoder.from_config(HFTextEncoderConfig(**encoder["config"]))
    raise ValueError(
        "question_encoder must be a module, a QuestionEncoderConfig / HFTextEncoderConfig, "
        f"or a {{'type': 'rnn'|'hf', 'config': ...}} dict, got {type(encoder).__name__}"
    )


def question_encoder_spec(encoder: nn.Module) -> dict[str, Any]:
    """`{"type": "rnn"|"hf", "config": {...}}`: rebuilds `encoder`'s architecture offline."""
    if isinstance(encoder, QuestionEncoder):
        return {"type": "rnn", "config": dataclasses.asdict(encoder.config)}
    if isinstance(encoder, HFTextQuestionEncoder):
        return {"type": "hf", "config": dataclasses.asdict(encoder.config)}
    raise ValueError(f"no spec for question encoder {type(encoder).__name__}")
