"""MEVF's image side (Nguyen et al., MICCAI 2019): a MAML-pretrained 4-layer CNN and
a convolutional denoising autoencoder, their features concatenated.

    pixels (B, 1, 128, 128) in [0, 1]
      -> resized to 84x84 -> MAML CNN -> spatial mean       -> (B, 64)
      -> autoencoder encoder -> (B, 16, 32, 32) -> linear    -> (B, 64)
      -> concat [maml, ae]                                   -> pooled (B, 128)
      -> autoencoder decoder                                 -> reconstruction (B, 1, 128, 128)

grid is (B, 1, 128), as in MEVF (one visual "object"): the autoencoder half is a
dense linear map over the whole 32x32 code, so no faithful spatial grid exists.
Layer shapes match MEVF's released `pretrained_maml.weights` and
`pretrained_ae.pth`; `mevf_weights.convert_mevf_weights` maps them onto this module.
MEVF trains the whole image side with the VQA head, adding
`AutoencoderReconstructionLoss` weighted by ae_alpha = 0.001.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._registry import register_encoder, register_family
from .base import ImageEncoder

logger = logging.getLogger(__name__)


@dataclass
class MEVFConfig:
    image_size: int = 128  # the autoencoder's input side (MEVF's images128x128)
    maml_image_size: int = 84  # the MAML CNN's input side (MEVF's images84x84); resized inside
    in_chans: int = 1
    mean: tuple[float, ...] = (0.0,)  # MEVF feeds [0, 1] gray pixels, and the AE reconstructs them
    std: tuple[float, ...] = (1.0,)
    maml_width: int = 64
    ae_dim: int = 64  # width of the linear map over the autoencoder code (MEVF's `convert`)
    bn_eps: float = 1e-5
    bn_momentum: float = 0.05


class MAMLConvNet(nn.Module):
    """Four blocks of conv3x3/stride 2 -> ReLU -> BatchNorm (MEVF applies ReLU before BN)."""

    def __init__(self, in_chans: int = 1, width: int = 64, eps: float = 1e-5, momentum: float = 0.05):
        super().__init__()
        self.layers = nn.ModuleList()
        for i in range(4):
            block = nn.Module()
            block.conv = nn.Conv2d(in_chans if i == 0 else width, width, kernel_size=3, stride=2, padding=1)
            block.norm = nn.BatchNorm2d(width, eps=eps, momentum=momentum)
            self.layers.append(block)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.layers:
            x = block.norm(F.relu(block.conv(x)))
        return x  # (B, 64, 6, 6) for 84x84 input


class ConvAutoencoder(nn.Module):
    """MEVF's convolutional denoising autoencoder (noise is added only when pretraining it)."""

    def __init__(self, in_chans: int = 1):
        super().__init__()
        self.enc1 = nn.Conv2d(in_chans, 64, kernel_size=3, padding=1)
        self.enc2 = nn.Conv2d(64, 32, kernel_size=3, padding=1)
        self.enc3 = nn.Conv2d(32, 16, kernel_size=3, padding=1)
        self.dec1 = nn.ConvTranspose2d(16, 32, kernel_size=3, stride=2, padding=1, output_padding=1)
        self.dec2 = nn.Conv2d(32, 32, kernel_size=3, padding=1)
        self.dec3 = nn.ConvTranspose2d(32, 64, kernel_size=3, stride=2, padding=1, output_padding=1)
        self.dec4 = nn.Conv2d(64, in_chans, kernel_size=3, padding=1)

    def encode(self, x: Tensor) -> Tensor:
        # MEVF pools after the ReLU; ReLU commutes with max-pooling (values and gradients alike), and after the pool it
        # reads a quarter of the values: the full-size (B, 64, S, S) activation is the step's costliest memory traffic
        x = F.relu(F.max_pool2d(self.enc1(x), 2))  # (B, 64, S/2, S/2)
        x = F.relu(F.max_pool2d(self.enc2(x), 2))  # (B, 32, S/4, S/4)
        return F.relu(self.enc3(x))  # (B, 16, S/4, S/4)

    def decode(self, code: Tensor) -> Tensor:
        # in place: a convolution's backward reads its input, not its output, so no second full-size copy is needed
        x = F.relu(self.dec1(code), inplace=True)  # (B, 32, S/2, S/2)
        x = F.relu(self.dec2(x), inplace=True)
        x = F.relu(self.dec3(x), inplace=True)  # (B, 64, S, S)
        return self.dec4(x).sigmoid()  # (B, 1, S, S) in [0, 1]


@register_family
class MEVFEncoder(ImageEncoder):
    family = "mevf"
    config_class = MEVFConfig

    def __init__(self, config: MEVFConfig, name: str = "mevf"):
        super().__init__(config, name)
        if config.image_size % 4:
            raise ValueError(f"MEVF image_size must be a multiple of 4, got {config.image_size}")
        self.maml = MAMLConvNet(config.in_chans, config.maml_width, config.bn_eps, config.bn_momentum)
        self.autoencoder = ConvAutoencoder(config.in_chans)
        code_size = 16 * (config.image_size // 4) ** 2  # 16384 at 128 px
        self.ae_proj = nn.Linear(code_size, config.ae_dim)
        self.feature_dim = config.maml_width + config.ae_dim
        self.grid_size = (1, 1)
        # the MAML branch's antialiased resize as a matrix, for ONNX export only (not a weight: never saved)
        self.register_buffer("maml_resize", _resize_matrix(config.image_size, config.maml_image_size),
                             persistent=False)

    def forward_features(self, pixels: Tensor) -> dict[str, Tensor]:
        ae_in = _resize(pixels, self.config.image_size)  # (B, 1, 128, 128)
        maml_in = self._maml_input(pixels)  # (B, 1, 84, 84)
        maml = self.maml(maml_in).flatten(2).mean(dim=2)  # (B, 64)
        code = self.autoencoder.encode(ae_in)  # (B, 16, 32, 32)
        ae = self.ae_proj(code.flatten(1))  # (B, 64)
        pooled = torch.cat([maml, ae], dim=-1)  # (B, 128)
        return {
            "grid": pooled.unsqueeze(1),  # (B, 1, 128)
            "pooled": pooled,
            "reconstruction": self.autoencoder.decode(code),  # (B, 1, 128, 128)
        }

    def _maml_input(self, pixels: Tensor) -> Tensor:
        if torch.onnx.is_in_onnx_export() and pixels.shape[-1] == pixels.shape[-2] == self.maml_resize.shape[1]:
            # ONNX (opset 17) has no antialiased resize: the same separable weights, as two matrix products
            m = self.maml_resize.to(pixels.dtype)
            return m @ pixels @ m.T
        return _resize(pixels, self.config.maml_image_size)

    def auxiliary_loss(self, features: dict[str, Tensor], pixels: Tensor) -> Tensor:
        """MEVF trains its autoencoder with the VQA head: the reconstruction error of the input."""
        return AutoencoderReconstructionLoss()(features["reconstruction"].float(), pixels.float())


def _resize(pixels: Tensor, side: int) -> Tensor:
    if pixels.shape[-2:] == (side, side):
        return pixels
    # antialiased, like the PIL resize MEVF used to make its 84x84 and 128x128 images
    return F.interpolate(pixels, size=(side, side), mode="bilinear", align_corners=False, antialias=True)


def _resize_matrix(size: int, side: int) -> Tensor:
    """(side, size): `_resize` along one axis as a matrix (the resize is separable), from resizing the unit vectors."""
    # image k: 1 on row k; two columns, since torch 2.14's antialiased kernel returns zeros for a one-column image
    unit = torch.eye(size).view(size, 1, size, 1).expand(size, 1, size, 2).contiguous()
    with torch.no_grad():
        resized = F.interpolate(unit, size=(side, 2), mode="bilinear", align_corners=False, antialias=True)
    return resized[:, 0, :, 0].T.contiguous()


class AutoencoderReconstructionLoss(nn.Module):
    """MSE between the autoencoder's reconstruction and its input pixels (MEVF's ae loss).

    `loss(outputs["reconstruction"], pixels)`; pixels are resized to the
    reconstruction's size when they differ. MEVF adds it with weight 0.001."""

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = weight

    def forward(self, reconstruction: Tensor, pixels: Tensor) -> Tensor:
        target = _resize(pixels, reconstruction.shape[-1])
        return self.weight * F.mse_loss(reconstruction, target)


@register_encoder("mevf", weights="random init; pretrained=FOLDER: MEVF's released files")
def mevf(pretrained: bool | str | os.PathLike = False, **overrides: Any) -> MEVFEncoder:
    """MEVF's MAML CNN + denoising autoencoder (D=128, N=1). `pretrained` may be MEVF's
    data folder (with pretrained_maml.weights and pretrained_ae.pth): the released weights
    are converted and loaded."""
    encoder = MEVFEncoder(MEVFConfig(**overrides), name="mevf")
    if pretrained is True:
        raise ValueError("MEVF's weights are not on a hub: pass pretrained=<folder with pretrained_maml.weights "
                         "and pretrained_ae.pth>")
    if pretrained:
        from .mevf_weights import convert_mevf_weights

        encoder.load_state_dict(convert_mevf_weights(pretrained), strict=True)
        logger.info("loaded MEVF's released image weights from %s", pretrained)
    return encoder
