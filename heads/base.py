"""The head interface every registered head follows, and question-encoder (re)building."""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

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
    # Capabilities, declared by each head (callers read these, never the head's name):
    needs_choices: ClassVar[bool] = False  # forward also takes choice_tokens / choice_lengths
    has_type_router: ClassVar[bool] = False  # outputs "type_logits" (CLOSED/OPEN) and routes on them
    needs_answer_groups: ClassVar[bool] = False  # config takes closed_mask / open_mask over the answers
    trainable: ClassVar[bool] = True  # `medvqa train` can train it (an ensemble is built from trained heads instead)
    # outputs "fused" (B, F), the vector its answer classifier reads (trust scores); never a multiple-choice head,
    # whose classes are positions, not answers
    has_fused_output: ClassVar[bool] = False
    loss_class: ClassVar[type | None] = None  # the loss module that trains it (heads.losses), `from_head(head, kind)`
    supported_losses: ClassVar[tuple[str, ...]] = ("bce", "bce-mean", "ce")  # kinds its loss class accepts
    default_loss: ClassVar[str] = "bce"

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
    """A question encoder from a module (returned as is: any module with `output_dim`, such as
    `encoders.TextQuestionEncoder`), a `QuestionEncoderConfig`, or an "rnn" spec dict."""
    if isinstance(encoder, nn.Module):
        if not hasattr(encoder, "output_dim"):
            raise ValueError(f"question encoder {type(encoder).__name__} has no `output_dim`")
        return encoder
    if isinstance(encoder, QuestionEncoderConfig):
        return QuestionEncoder(encoder)
    if isinstance(encoder, Mapping) and encoder.get("type") == "rnn":
        return QuestionEncoder(QuestionEncoderConfig(**encoder["config"]))
    if isinstance(encoder, Mapping) and encoder.get("type") == "module":
        raise ValueError(f"the head's question encoder is a {encoder.get('class')} built outside `heads`: "
                         "rebuild it from its spec's config and pass the module")
    raise ValueError(
        "question_encoder must be a module, a QuestionEncoderConfig, "
        f"or a {{'type': 'rnn', 'config': ...}} dict, got {type(encoder).__name__}"
    )


def question_encoder_spec(encoder: nn.Module) -> dict[str, Any]:
    """`{"type": "rnn", "config": ...}` for the heads' own RNN encoder (rebuilt by `create_question_encoder`);
    `{"type": "module", "class": ..., "config": encoder.export_config()}` for one built elsewhere."""
    if isinstance(encoder, QuestionEncoder):
        return {"type": "rnn", "config": dataclasses.asdict(encoder.config)}
    if hasattr(encoder, "export_config"):
        return {"type": "module", "class": type(encoder).__name__, "config": encoder.export_config()}
    raise ValueError(f"no spec for question encoder {type(encoder).__name__} (it has no export_config())")
