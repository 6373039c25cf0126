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
import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import Tensor, nn

from .images import ImageSource, load_image

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


class ImageEncoder(nn.Module):
    """Base class: subclasses set `family`, `config_class`, `feature_dim`, `grid_size`
    and implement `forward_features`. The config dataclass must have the fields
    `image_size`, `in_chans`, `mean` and `std`."""

    family: ClassVar[str] = ""  # key in config.json that picks the class when loading
    config_class: ClassVar[type]

    def __init__(self, config: Any, name: str) -> None:
        super().__init__()
        self.config = config
        self.name = name
        self.feature_dim: int = 0
        self.grid_size: tuple[int, int] = (1, 1)
        self._frozen = False

    # -- preprocessing, described by the encoder itself ------------------------------
    @property
    def image_size(self) -> int:
        return int(self.config.image_size)

    @property
    def in_chans(self) -> int:
        return int(self.config.in_chans)

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(self.config.mean)

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(self.config.std)

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def preprocess(self, images: Sequence[ImageSource] | ImageSource) -> Tensor:
        """Images (PIL, paths, arrays) -> normalised float32 pixels (B, in_chans, S, S).

        Every image is resized to a square (bicubic, no crop: cropping could cut
        anatomy out of a radiograph)."""
        if isinstance(images, (Image.Image, np.ndarray, str, os.PathLike)):
            images = [images]
        mode = "L" if self.in_chans == 1 else "RGB"
        side = self.image_size
        batch = []
        for image in images:
            img = load_image(image).convert(mode).resize((side, side), Image.Resampling.BICUBIC)
            arr = np.asarray(img, dtype=np.float32).reshape(side, side, -1) / 255.0  # (S, S, C)
            batch.append(torch.from_numpy(arr).permute(2, 0, 1))
        pixels = torch.stack(batch)  # (B, C, S, S)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
        return (pixels - mean) / std

    # -- forward -------------------------------------------------------------------
    def forward_features(self, pixels: Tensor) -> dict[str, Tensor]:
        """pixels (B, C, H, W) -> {"grid": (B, N, D), "pooled": (B, D), ...}."""
        raise NotImplementedError

    def forward(self, pixels: Tensor) -> dict[str, Tensor]:
        return self.forward_features(pixels)

    # -- freezing ------------------------------------------------------------------
    def freeze(self) -> "ImageEncoder":
        """No gradients and eval mode; stays in eval even when a parent calls .train()."""
        for p in self.parameters():
            p.requires_grad_(False)
        self._frozen = True
        return self.eval()

    def unfreeze(self) -> "ImageEncoder":
        for p in self.parameters():
            p.requires_grad_(True)
        self._frozen = False
        return self.train()

    @property
    def frozen(self) -> bool:
        return self._frozen

    def train(self, mode: bool = True) -> "ImageEncoder":
        # A frozen encoder must not update BatchNorm statistics or use dropout,
        # else its features drift away from the cached ones.
        return super().train(mode and not self._frozen)

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
        """sha256 of family + config + every state_dict tensor (name, dtype, shape, bytes).

        Hashes all weights, so it costs about a second per 300 MB; call it once per run."""
        h = hashlib.sha256()
        h.update(json.dumps({"family": self.family, "config": dataclasses.asdict(self.config)}, sort_keys=True).encode())
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
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            (tmp / CONFIG_NAME).write_text(json.dumps(self.export_config(), indent=2) + "\n")
            if not directory.exists():
                os.replace(tmp, directory)
            else:
                for filename in (WEIGHTS_NAME, CONFIG_NAME):
                    os.replace(tmp / filename, directory / filename)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("saved encoder %s to %s", self.name, directory)
        return directory

    @classmethod
    def from_config(cls, config: dict[str, Any], name: str) -> "ImageEncoder":
        """Build the architecture (random weights) from config.json's "config"."""
        return cls(config_from_dict(cls.config_class, config), name=name)

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, feature_dim={self.feature_dim}, grid_size={self.grid_size}, "
                f"image_size={self.image_size}, in_chans={self.in_chans}")
