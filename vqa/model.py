"""A VQA model: an image encoder and a head (question encoder + fusion + answer scorer)."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn


class VQAModel(nn.Module):
    """Pixels or cached features + a tokenised question -> the head's outputs.

    Training on a frozen encoder feeds cached features to `forward`; fine-tuning
    the encoder (MEVF's recipe) and inference go through `forward_pixels`.
    """

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, features: Mapping[str, torch.Tensor], tokens: torch.Tensor, lengths: torch.Tensor,
                **choices: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.head(features, tokens, lengths, **choices)

    def forward_pixels(self, pixels: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor,
                       **choices: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.encoder(pixels)  # {"grid": (B, N, D), "pooled": (B, D), ...}
        out = dict(self.head(features, tokens, lengths, **choices))
        if "reconstruction" in features:  # MEVF's autoencoder, trained with its own loss
            out["reconstruction"] = features["reconstruction"]
        return out
