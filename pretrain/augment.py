"""Training-time augmentation of uint8 image batches for contrastive pretraining."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def augment(pixels: Tensor, generator: torch.Generator, strength: float = 1.0) -> Tensor:
    """A small random affine per image (scale 0.9-1.1, rotation +-8 deg, shift +-6 %) on uint8 pixels.

    No flips: left and right carry meaning in radiology. Borders fill with black."""
    b = pixels.shape[0]
    r = torch.rand(b, 4, generator=generator) * 2 - 1  # (B, 4) in [-1, 1]
    scale = 1 + 0.1 * strength * r[:, 0]
    angle = math.radians(8) * strength * r[:, 1]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, 0.06 * strength * r[:, 2]], 1),
                         torch.stack([sin, cos, 0.06 * strength * r[:, 3]], 1)], 1)  # (B, 2, 3)
    x = pixels.float()
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)
