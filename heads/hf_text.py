"""Question encoder over any Hugging Face text model (a CLIP text tower, BERT, MiniLM, ...).

`transformers` is imported inside the constructor, so the rest of `heads`
works on a machine without it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from .layers import length_mask

logger = logging.getLogger(__name__)

_POOLINGS = ("last", "first", "mean")


@dataclass
class HFTextEncoderConfig:
    name_or_path: str  # hub id or local folder (model, and tokenizer for `tokenize`)
    output_dim: int | None = None  # project to this size; None keeps the model's hidden size
    pooling: str = "last"  # "last" valid token (CLIP's EOS), "first" ([CLS]) or "mean" of valid tokens
    freeze: bool = False  # keep the text model fixed (and in eval mode)
    # The model's own config (`config.to_dict()`): with it the architecture is
    # rebuilt offline and the weights come from a state dict (a bundle).
    hf_config: dict[str, Any] | None = None


class HFTextQuestionEncoder(nn.Module):
    """`{"tokens": (B, L, H), "pooled": (B, H)}` from a Hugging Face text model.

    Tokens come from the model's own tokenizer (see `tokenize`), right-padded.
    For a dual encoder (CLIP, SigLIP) only its `text_model` tower is kept.
    """

    def __init__(
        self,
        name_or_path: str,
        *,
        output_dim: int | None = None,
        pooling: str = "last",
        freeze: bool = False,
        hf_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel

        if pooling not in _POOLINGS:
            raise ValueError(f"pooling must be one of {_POOLINGS}, got {pooling!r}")
        if hf_config is None:
            # float32 master weights whatever the checkpoint's dtype; autocast handles precision.
            model = AutoModel.from_pretrained(name_or_path).float()
            logger.info("loaded text model %s (%s)", name_or_path, type(model).__name__)
        else:
            fields = dict(hf_config)
            config = AutoConfig.for_model(fields.pop("model_type"), **fields)
            model = AutoModel.from_config(config)
        hf_config = model.config.to_dict()
        if hasattr(model, "text_model") and hasattr(model, "vision_model"):
            model = model.text_model  # the image tower lives in `encoders`, not here
        self.model = model
        self._tokenizer = None
        hidden = int(getattr(model.config, "hidden_size"))
        self.proj = nn.Identity() if output_dim in (None, hidden) else nn.Linear(hidden, output_dim)
        self.output_dim = output_dim or hidden
        self.config = HFTextEncoderConfig(name_or_path, output_dim, pooling, freeze, hf_config)
        if freeze:
            self.model.requires_grad_(False)
            self.model.eval()

    @classmethod
    def from_config(cls, config: HFTextEncoderConfig) -> "HFTextQuestionEncoder":
        """Rebuild the architecture (no weights downloaded when `config.hf_config` is set)."""
        return cls(
            config.name_or_path,
            output_dim=config.output_dim,
            pooling=config.pooling,
            freeze=config.freeze,
            hf_config=config.hf_config,
        )

    def train(self, mode: bool = True) -> "HFTextQuestionEncoder":
        super().train(mode)
        if self.config.freeze:
            self.model.eval()  # a frozen tower keeps dropout off
        return self

    def tokenize(self, texts: Sequence[str], max_length: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, max_length), right-padded, and lengths (B,) with the model's tokenizer."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.config.name_or_path)
            self._tokenizer.padding_side = "right"
        batch = self._tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
        )
        return batch["input_ids"], batch["attention_mask"].sum(dim=1)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        mask = length_mask(lengths, tokens.shape[1])  # (B, L)
        out = self.model(input_ids=tokens, attention_mask=mask.long())
        hidden = self.proj(out.last_hidden_state) * mask.unsqueeze(-1)  # (B, L, H), zeros at padding
        if self.config.pooling == "last":
            last = (lengths.clamp(min=1) - 1).view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
            pooled = hidden.gather(1, last).squeeze(1)  # (B, H)
        elif self.config.pooling == "first":
            pooled = hidden[:, 0]  # (B, H)
        else:
            pooled = hidden.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)  # (B, H)
        return {"tokens": hidden, "pooled": pooled}
