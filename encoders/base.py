"""The one interface every image encoder implements.

An encoder maps pixels (B, C, H, W) to a dict with stable keys:
    "grid":   (B, N, D) region/patch features, N = grid_size[0] * grid_size[1]
    "pooled": (B, D)    one vector per image
(plus encoder-specific extras, e.g. MEVF's "reconstruction").

It also describes its own preprocessing (image_size, in_chans, mean, std), saves
itself as `config.json` + `model.safetensors`, and has a `fingerprint()` that
keys the frozen-feature cache.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from ._errors import DataError
from ._files import atomic_dir, atomic_write_json, atomic_write_safetensors
from .images import ImageSource

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_NAME = "medvqa-encoder"
FORMAT_VERSION = 1


def config_from_dict(config_class: type, values: dict[str, Any]) -> Any:
    """Rebuild a config dataclass from `dataclasses.asdict` output (JSON lists -> tuples)."""
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{config_class.__name__} has no field(s) {unknown}; known: {sorted(known)}")
    return config_class(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


class Freezable(nn.Module):
    """`freeze()`: no gradients, and eval mode kept through a parent's `.train()` calls (BatchNorm
    statistics and dropout stay fixed, so features match cached ones); `unfreeze()` undoes it."""

    _frozen: bool = False
    _norm_frozen: bool = False
    _grad_checkpointing: bool = False

    def freeze(self):
        for p in self.parameters():
            p.requires_grad_(False)
        self._frozen = True
        return self.eval()

    def unfreeze(self):
        for p in self.parameters():
            p.requires_grad_(True)
        self._frozen = False
        return self.train()

    @property
    def frozen(self) -> bool:
        return self._frozen

    @property
    def batch_norms(self) -> list[nn.Module]:
        """The BatchNorm layers (any dimension, synchronised or not): those whose statistics training moves."""
        return [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def freeze_norm_(self, frozen: bool = True):
        """Keep BatchNorm statistics fixed while the rest trains (the layers stay in eval mode through `.train()`;
        their scale and shift still learn). Fine-tuning a pretrained CNN on small, augmented batches otherwise
        re-estimates the statistics the rest of the model was fitted to: the features under a head move at once."""
        self._norm_frozen = frozen
        return self.train(self.training)

    @property
    def grad_checkpointing(self) -> bool:
        return self._grad_checkpointing

    def set_grad_checkpointing(self, enable: bool = True):
        """Recompute each block's activations in the backward pass instead of keeping them from the forward: a
        trained tower's activation memory drops to about one block's, for about one more forward of compute.
        Gradients are unchanged. Refused while BatchNorm statistics train: the recompute would update them a
        second time each step (keep them as pretrained with `freeze_norm_()`, `--encoder-norm frozen`)."""
        self._set_grad_checkpointing(enable)  # raises where the architecture has none
        trained_norms = not (self._frozen or self._norm_frozen) and self.batch_norms
        if enable and trained_norms:
            self._set_grad_checkpointing(False)
            raise DataError(f"{self.label}: gradient checkpointing recomputes each block in the backward pass, "
                            f"which would update the running statistics of its {len(trained_norms)} BatchNorm "
                            "layers a second time per step; keep them as pretrained (under a VQA head: "
                            "--encoder-norm frozen) or train without --grad-checkpointing")
        self._grad_checkpointing = enable
        return self

    def _set_grad_checkpointing(self, enable: bool) -> None:
        """Switch the architecture's own block-wise checkpointing; the families that have one override this."""
        if enable:
            raise DataError(f"{self.label}: {type(self).__name__} has no gradient checkpointing")

    @property
    def label(self) -> str:
        """What error messages call this tower: an image encoder's name, a text tower's source."""
        return str(getattr(self, "name", None) or getattr(self, "source", None) or type(self).__name__)

    def train(self, mode: bool = True):
        super().train(mode and not self._frozen)
        if mode and self._norm_frozen:
            for norm in self.batch_norms:
                norm.eval()
        return self


def set_hf_grad_checkpointing(model: nn.Module, enable: bool) -> bool:
    """Hugging Face's per-layer checkpointing on or off in `model`, a bare tower included (what
    `PreTrainedModel.gradient_checkpointing_enable` does, non-reentrant); False when it has no such layer."""
    from torch.utils.checkpoint import checkpoint

    layers = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    for m in layers:
        m._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)
        m.gradient_checkpointing = enable
    return bool(layers)


class ImageEncoder(Freezable):
    """Base class: subclasses set `family`, `config_class`, `feature_dim`, `grid_size`
    and implement `forward_features`. The config dataclass must have the fields
    `image_size`, `in_chans`, `mean` and `std`."""

    family: ClassVar[str] = ""  # key in config.json that picks the class when loading
    config_class: ClassVar[type]
    # config fields that only record where the weights came from: left out of the fingerprint, so the
    # same weights reached by two paths share one feature cache
    provenance_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: Any, name: str) -> None:
        super().__init__()
        self.config = config
        self.name = name
        self.feature_dim: int = 0
        self.grid_size: tuple[int, int] = (1, 1)

    # -- preprocessing, described by the encoder itself ------------------------------
    @property
    def image_size(self) -> int:
        return int(self.config.image_size)

    @property
    def in_chans(self) -> int:
        return int(self.config.in_chans)

    @property
    def mean(self) -> tuple[float, ...]:
        return self._per_channel(self.config.mean)

    @property
    def std(self) -> tuple[float, ...]:
        return self._per_channel(self.config.std)

    def _per_channel(self, values) -> tuple[float, ...]:
        """A grayscale tower (in_chans=1) with RGB statistics (timm's pretrained cfg, whose first conv timm sums
        over the colours): its one channel is normalised by their average."""
        values = tuple(float(v) for v in values)
        return (sum(values) / len(values),) if self.in_chans == 1 and len(values) > 1 else values

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def preprocess(self, images: Sequence[ImageSource] | ImageSource) -> Tensor:
        """Images (PIL, paths, arrays) -> normalised float32 pixels (B, in_chans, S, S).

        Every image is resized to a square (`pixels.square_pixels`), then normalised
        (`pixels.normalize`): the same two steps the pixel tables of training use."""
        from .pixels import preprocess

        if isinstance(images, (Image.Image, np.ndarray, str, os.PathLike)):
            images = [images]
        return preprocess(images, self)  # (B, C, S, S)

    # -- forward -------------------------------------------------------------------
    def forward_features(self, pixels: Tensor) -> dict[str, Tensor]:
        """pixels (B, C, H, W) -> {"grid": (B, N, D), "pooled": (B, D), ...}."""
        raise NotImplementedError

    def forward(self, pixels: Tensor) -> dict[str, Tensor]:
        return self.forward_features(pixels)

    def channels_last_(self) -> "ImageEncoder":
        """NHWC weights for the convolutions (other layers are unchanged), for training through the encoder: oneDNN's
        faster CPU kernels (benchmarks/finetune_layout.py: a step 1.5x faster for EfficientNet-Lite0, 1.2x for
        ResNet-10t) and the layout AMP convolutions prefer on GPUs. Feed it channels-last pixels too."""
        return self.to(memory_format=torch.channels_last)

    @torch.no_grad()
    def encode(self, images: Sequence[ImageSource], device: torch.device | str | None = None) -> dict[str, Tensor]:
        """A batch of images as frozen features, as the feature cache stores them and heads read them:
        {"grid": (B, N, D), "pooled": (B, D)} float16 on the CPU. Call in eval mode."""
        device = torch.device(device) if device is not None else next(self.parameters()).device
        feats = self(self.preprocess(images).to(device))
        out = {key: feats[key].to("cpu", torch.float16) for key in ("grid", "pooled")}
        for key, value in out.items():  # stored as float16: a feature past its range would be an inf for good
            if not bool(torch.isfinite(value).all()):
                largest = float(feats[key].float().abs().max())
                raise DataError(f"encoder {self.name}: its {key} features reach {largest:.3g}, beyond float16's "
                                "65504 (or are not finite), which the feature cache stores them in; normalise them "
                                "(a projection or LayerNorm at the output) or train the head through the encoder")
        return out

    def auxiliary_loss(self, features: dict[str, Tensor], pixels: Tensor) -> Tensor | None:
        """A loss this encoder adds to the task's while it is fine-tuned (MEVF's autoencoder); None: none."""
        return None

    # -- identity and persistence --------------------------------------------------
    def export_config(self) -> dict[str, Any]:
        """What config.json holds: enough to rebuild the module before loading weights."""
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "family": self.family,
            "name": self.name,
            "config": dataclasses.asdict(self.config),
            "feature_dim": self.feature_dim,  # informational
            "grid_size": list(self.grid_size),  # informational
        }

    def fingerprint(self) -> str:
        """sha256 of family + config (less `provenance_fields`) + every state_dict tensor (name, dtype, shape, bytes).

        Hashes all weights, so it costs about a second per 300 MB; call it once per run."""
        h = hashlib.sha256()
        config = {k: v for k, v in dataclasses.asdict(self.config).items() if k not in self.provenance_fields}
        h.update(json.dumps({"family": self.family, "config": config}, sort_keys=True).encode())
        for key, tensor in self.state_dict().items():
            t = tensor.detach().cpu().contiguous()
            h.update(f"|{key}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # raw bytes, any dtype
        return h.hexdigest()

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write config.json + model.safetensors.

        A new folder appears at once (written under a temp name, then renamed);
        into an existing folder each file is replaced atomically and other files
        (e.g. the rest of a bundle) are left alone."""
        directory = Path(directory)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        if directory.exists():
            atomic_write_safetensors(directory / WEIGHTS_NAME, state, metadata={"format": "pt"})
            atomic_write_json(directory / CONFIG_NAME, self.export_config())
        else:
            with atomic_dir(directory) as tmp:
                atomic_write_safetensors(tmp / WEIGHTS_NAME, state, metadata={"format": "pt"})
                atomic_write_json(tmp / CONFIG_NAME, self.export_config())
        logger.info("saved encoder %s to %s", self.name, directory)
        return directory

    @classmethod
    def from_config(cls, config: dict[str, Any], name: str) -> "ImageEncoder":
        """Build the architecture (random weights) from config.json's "config"."""
        return cls(config_from_dict(cls.config_class, config), name=name)

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, feature_dim={self.feature_dim}, grid_size={self.grid_size}, "
                f"image_size={self.image_size}, in_chans={self.in_chans}")
