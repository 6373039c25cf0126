"""Training-time augmentation of uint8 image batches (CLIP pretraining, fine-tuning an encoder under a head).

Medical images allow little: a small affine, a random resized crop, a brightness/contrast
jitter. Never a horizontal flip: left and right carry meaning in radiology.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def augment(pixels: Tensor, generator: torch.Generator, strength: float = 1.0, crop: float = 0.0,
            intensity: float = 0.0, draws: tuple[int, int] | None = None) -> Tensor:
    """A small random affine per image (scale 0.9-1.1, rotation +-8 deg, shift +-6 %) on uint8 pixels (B, C, S, S).

    `crop` > 0 also zooms into a random part covering at least 1 - `crop` of each side (a random resized
    crop); `intensity` > 0 scales contrast and shifts brightness by up to that share. Borders fill with black.
    `draws` = (offset, n): the images are positions offset.. of a batch of n (a DDP rank's share of the global
    batch, `Shard.draws`): the draws are made for all n and these taken, as one process would draw them."""
    b = pixels.shape[0]
    offset, n = draws or (0, b)

    def rand(*shape: int) -> Tensor:
        return torch.rand(n, *shape, generator=generator)[offset:offset + b]

    r = rand(4) * 2 - 1  # (B, 4) in [-1, 1]
    scale = 1 + 0.1 * strength * r[:, 0]
    if crop > 0:  # a crop of side 1 - crop * u (u in [0, 1]) is an affine zoom by that factor
        scale = scale / (1 - crop * rand())
    angle = math.radians(8) * strength * r[:, 1]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, 0.06 * strength * r[:, 2]], 1),
                         torch.stack([sin, cos, 0.06 * strength * r[:, 3]], 1)], 1)  # (B, 2, 3)
    x = pixels.float()
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if intensity > 0:
        jitter = (rand(2) * 2 - 1) * intensity  # (B, 2): contrast, brightness
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = (out - mean) * (1 + jitter[:, 0].view(-1, 1, 1, 1)) + mean + 255 * jitter[:, 1].view(-1, 1, 1, 1)
    return out.round_().clamp_(0, 255).to(torch.uint8)
