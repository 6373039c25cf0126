"""Any timm backbone as an ImageEncoder.

grid   = `forward_features` output as tokens: CNN maps (B, C, H, W) -> (B, H*W, C);
         ViT tokens without their prefix (CLS/register) tokens
pooled = the model's own pooling (`forward_head(pre_logits=True)`: average pool,
         CLS token, CLIP's attention pool) or, with pool="avg", the mean of the grid
An optional linear projection maps both to `embed_dim` (CLIP-style towers).

Weights: random (`pretrained=False`), timm's own (`pretrained=True`: the hub or its cache), or a local
file in timm's naming (`weights="file.safetensors"`, or a path as `pretrained`; the offline equivalent of
timm's `pretrained_cfg_overlay=dict(file=...)`, read safely by `encoders._weights` and loaded strictly:
every backbone tensor must be in the file, classifier tensors are dropped).
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn

from ._errors import DataError
from ._registry import register_encoder, register_family
from .base import ImageEncoder
from .clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

logger = logging.getLogger(__name__)


@dataclass
class TimmEncoderConfig:
    model_name: str = "resnet50"  # any timm name, optionally with a tag ("resnet50.a1_in1k")
    image_size: int = 224
    in_chans: int = 3  # timm adapts the first conv of pretrained weights to 1 channel
    mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, ...] = IMAGENET_DEFAULT_STD
    embed_dim: int | None = None  # None: no projection, D = the backbone's width
    pool: str = "model"  # "model": the backbone's own pooling; "avg": mean of the grid
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {"img_size": 64, "depth": 2}


@register_family
class TimmEncoder(ImageEncoder):
    family = "timm"
    config_class = TimmEncoderConfig

    def __init__(self, config: TimmEncoderConfig, name: str = "timm", pretrained: bool | str | os.PathLike = False):
        super().__init__(config, name)
        if config.pool not in ("model", "avg"):
            raise ValueError(f"pool must be 'model' or 'avg', got {config.pool!r}")
        weights = None if isinstance(pretrained, bool) or pretrained is None else Path(pretrained)
        try:
            self.backbone = timm.create_model(config.model_name, pretrained=bool(pretrained) and weights is None,
                                              num_classes=0, in_chans=config.in_chans, **config.model_kwargs)
        except OSError as e:  # pretrained weights unreachable (offline, not cached)
            raise OSError(f"cannot load pretrained timm weights for {config.model_name!r}: no network access "
                          f"(or HF_HUB_OFFLINE=1) and no cached copy; use pretrained=False or run once online. "
                          f"({e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
        if weights is not None:
            self.load_backbone_weights(weights)
        width = self.backbone.num_features
        self.proj = nn.Linear(width, config.embed_dim) if config.embed_dim else nn.Identity()
        self.feature_dim = config.embed_dim or width
        self.grid_size = self._probe_grid(width)

    def load_backbone_weights(self, path: Path, state: dict[str, Tensor] | None = None) -> None:
        """Load a timm-named state dict (from `path`, or `state` read from it) into the backbone, strictly."""
        from ._weights import read_weights

        state = read_weights(path) if state is None else state
        own = self.backbone.state_dict()
        classifier = self.backbone.pretrained_cfg.get("classifier", "fc")
        classifiers = classifier if isinstance(classifier, (list, tuple)) else [classifier]
        state = {k: v for k, v in state.items() if k in own or not k.startswith(tuple(f"{c}." for c in classifiers))}
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or shapes:
            raise DataError(f"{path}: not {self.config.model_name} weights in timm's naming (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}, shape differs {shapes[:3]}; {len(state)} tensors)")
        self.backbone.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
        logger.info("loaded %s weights from %s", self.config.model_name, path)

    def _tokens(self, feats: Tensor) -> Tensor:
        """Backbone features -> (B, N, C) tokens."""
        if feats.ndim == 4:
            if getattr(self.backbone, "output_fmt", "NCHW") == "NHWC":  # e.g. Swin
                return feats.flatten(1, 2)
            return feats.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)
        if feats.ndim == 3:
            return feats[:, getattr(self.backbone, "num_prefix_tokens", 0):]  # drop CLS/register tokens
        raise ValueError(f"{self.config.model_name}: unexpected forward_features shape {tuple(feats.shape)}")

    @torch.no_grad()
    def _probe_grid(self, width: int) -> tuple[int, int]:
        """Run one blank image to learn the grid shape (cheaper than per-model rules)."""
        was_training = self.backbone.training
        self.backbone.eval()
        size = self.config.image_size
        feats = self.backbone.forward_features(torch.zeros(1, self.config.in_chans, size, size))
        self.backbone.train(was_training)
        if feats.ndim == 4:
            h, w = feats.shape[1:3] if getattr(self.backbone, "output_fmt", "NCHW") == "NHWC" else feats.shape[2:]
            grid = (int(h), int(w))
        else:
            n = self._tokens(feats).shape[1]
            patch_grid = getattr(getattr(self.backbone, "patch_embed", None), "grid_size", None)
            grid = tuple(patch_grid) if patch_grid and math.prod(patch_grid) == n else (1, n)
        if self.config.pool == "model":
            pooled = self.backbone.forward_head(feats, pre_logits=True)
            if pooled.shape[-1] != width:
                raise ValueError(f"{self.config.model_name}: pooled width {pooled.shape[-1]} != grid width "
                                 f"{width}; use pool='avg'")
        return grid

    def _set_grad_checkpointing(self, enable: bool) -> None:
        try:
            self.backbone.set_grad_checkpointing(enable)
        except (AssertionError, NotImplementedError) as e:  # timm's models without it say so this way
            raise DataError(f"{self.name}: timm's {self.config.model_name} has no gradient checkpointing "
                            f"({e or type(e).__name__})") from None

    def forward_features(self, pixels: Tensor) -> dict[str, Tensor]:
        feats = self.backbone.forward_features(pixels)
        grid = self._tokens(feats)  # (B, N, C)
        if self.config.pool == "model":
            pooled = self.backbone.forward_head(feats, pre_logits=True)  # (B, C)
        else:
            pooled = grid.mean(dim=1)  # (B, C)
        return {"grid": self.proj(grid), "pooled": self.proj(pooled)}  # (B, N, D), (B, D)


def default_config(model_name: str, **overrides: Any) -> TimmEncoderConfig:
    """A config whose image size and mean/std come from timm's pretrained cfg, if it has one."""
    if not timm.is_model(model_name):
        raise ValueError(f"unknown timm model {model_name!r} (see timm.list_models())")
    values: dict[str, Any] = {"model_name": model_name}
    cfg = timm.models.get_pretrained_cfg(model_name)
    if cfg is not None:
        values.update(image_size=int(cfg.input_size[-1]), mean=tuple(cfg.mean), std=tuple(cfg.std))
    values.update(overrides)
    return TimmEncoderConfig(**values)


def create_timm_encoder(model_name: str, pretrained: bool | str | os.PathLike = False, name: str | None = None,
                        weights: str | os.PathLike | None = None, **overrides: Any) -> TimmEncoder:
    """`create_encoder("timm:<model_name>", pretrained=..., weights=FILE, **config overrides)`."""
    if weights is not None and pretrained not in (False, None):
        raise ValueError(f"timm:{model_name}: pass weights=FILE or pretrained, not both")
    return TimmEncoder(default_config(model_name, **overrides), name=name or f"timm:{model_name}",
                       pretrained=weights if weights is not None else pretrained)


def _register(name: str, model_name: str, doc: str, **defaults: Any) -> None:
    def factory(pretrained: bool = False, **overrides: Any) -> TimmEncoder:
        return TimmEncoder(default_config(model_name, **{**defaults, **overrides}), name=name, pretrained=pretrained)

    factory.__name__ = name.replace("-", "_")
    factory.__doc__ = doc
    register_encoder(name, weights="random init; pretrained=True: timm's hub weights")(factory)


_register("resnet18", "resnet18", "torchvision-style ResNet-18 (grid 7x7, D=512).")
_register("resnet50", "resnet50", "ResNet-50 (grid 7x7, D=2048).")
_register("vit_base_patch32_224", "vit_base_patch32_224", "ViT-B/32 (grid 7x7, D=768).")
_register("vit_base_patch16_224", "vit_base_patch16_224", "ViT-B/16 (grid 14x14, D=768).")
_register("clip-rn50", "resnet50_clip",
          "OpenAI CLIP's ModifiedResNet-50 image tower with its attention pool (the tower PubMedCLIP RN50 and "
          "PMC-CLIP fine-tune); pretrained=True loads OpenAI's weights (timm/resnet50_clip.openai). "
          "Grid 7x7, D=2048; pass embed_dim=1024 for a CLIP-sized projection.",
          mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
_register("resnet-tiny", "resnet10t", "ResNet-10-T at 64 px for tests (grid 2x2, D=512).", image_size=64)
_register("vit-tiny", "vit_tiny_patch16_224", "A 2-layer ViT-Tiny at 64 px for tests (grid 4x4, D=192).",
          image_size=64, model_kwargs={"img_size": 64, "depth": 2})
