"""A VQA model: an image encoder and a head (question encoder + fusion + answer scorer)."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

IMAGE_FEATURES = ("grid", "pooled")


class VQAModel(nn.Module):
    """Pixels or cached features + a tokenised question -> the head's outputs.

    Training on a frozen encoder, evaluation and the Predictor feed features (cached, or
    computed by `ImageEncoder.encode`) to `forward`; fine-tuning the encoder (MEVF's
    recipe) feeds it pixels, through the same `forward`, so that a DDP or compiled wrapper
    sees every call.
    `image_features` picks what the head attends over: the encoder's grid of
    regions (B, N, D), or its pooled vector as a single region (B, 1, D), which
    is how PubMedCLIP feeds CLIP's image embedding to MEVF/QCR heads.
    """

    def __init__(self, encoder: nn.Module, head: nn.Module, image_features: str = "grid"):
        super().__init__()
        if image_features not in IMAGE_FEATURES:
            raise ValueError(f"image_features must be one of {IMAGE_FEATURES}, got {image_features!r}")
        self.encoder = encoder
        self.head = head
        self.image_features = image_features

    def select(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The regions the head sees, per `image_features`."""
        if self.image_features == "pooled":
            return {"grid": features["pooled"].unsqueeze(1), "pooled": features["pooled"]}  # (B, 1, D)
        return {"grid": features["grid"], "pooled": features["pooled"]}

    def forward(self, images: Mapping[str, torch.Tensor] | torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor,
                **choices: torch.Tensor) -> dict[str, torch.Tensor]:
        """`images`: the encoder's features ({"grid": (B, N, D), "pooled": (B, D)}), or pixels (B, C, H, W) that
        go through the encoder first (fine-tuning: the output then carries the encoder's outputs as
        `image_features`, for its own auxiliary loss, MEVF's autoencoder)."""
        if isinstance(images, Mapping):
            return self.head(self.select(images), tokens, lengths, **choices)
        features = self.encoder(images)
        out = dict(self.head(self.select(features), tokens, lengths, **choices))
        out["image_features"] = features
        return out
