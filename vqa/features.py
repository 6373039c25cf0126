"""Image inputs for the heads: frozen encoder features (cached, or computed for the Predictor) or pixels.

Every path gives the head the same numbers for the same image: features are computed by
`ImageEncoder.encode` and kept in float16, as the feature cache stores them, and pixels go
through the encoder's own preprocessing (`encoders.pixels`).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import torch

log = logging.getLogger(__name__)


def default_cache_root() -> Path:
    """$MEDVQA_CACHE, else ~/.cache/medvqa: feature caches and the demo's default model live here."""
    return Path(os.environ.get("MEDVQA_CACHE", Path.home() / ".cache" / "medvqa"))


def cache_folder(encoder, root: str | Path | None = None) -> Path:
    """One cache folder per encoder identity, so switching encoders never rebuilds another's cache."""
    base = Path(root) if root else default_cache_root() / "features"
    return base / f"{encoder.name.replace('/', '_')}-{encoder.fingerprint()[:12]}"


def feature_table(encoder, images: Sequence, cache_dir: str | Path | None = None, batch_size: int = 32,
                  device: torch.device | str = "cpu", progress: bool = True) -> dict[str, torch.Tensor]:
    """Features of `images` as {"grid": (I, N, D), "pooled": (I, D)} float16, encoded at most once ever.

    Rows follow `images`. Missing images are encoded into the on-disk cache first."""
    from encoders import FeatureCache

    folder = cache_folder(encoder, cache_dir)
    cache = FeatureCache.open(folder, encoder)
    hashes = cache.ensure(images, batch_size=batch_size, device=device, progress=progress)
    table = cache.lookup(hashes)
    return {k: v.to(torch.float16) for k, v in table.items()}


@torch.no_grad()
def encode_features(encoder, images: Sequence, batch_size: int = 32,
                    device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The same table as `feature_table`, computed without the cache (images the Predictor is given)."""
    parts = [encoder.encode(images[start:start + batch_size], device) for start in range(0, len(images), batch_size)]
    return {key: torch.cat([p[key] for p in parts]) for key in ("grid", "pooled")}


def pixel_table(encoder, images: Sequence, progress: bool = True):
    """The images as uint8 pixels at the encoder's size (`encoders.ImageTable`), for training through it."""
    from encoders import ImageTable

    return ImageTable(images, encoder.image_size, encoder.in_chans, progress=progress)


@torch.no_grad()
def pooled_features(encoder, images, device: torch.device | str = "cpu", batch_size: int = 64) -> torch.Tensor:
    """(I, D) pooled features of a feature table, or of an `encoders.ImageTable` of pixels run through
    `encoder` (eval mode), rounded to float16 as `ImageEncoder.encode` gives them."""
    if isinstance(images, dict):
        return images["pooled"].float()
    from encoders import normalize

    was_training = encoder.training
    encoder.eval()
    try:
        parts = [encoder(normalize(images.pixels[s:s + batch_size], encoder, torch.device(device)))["pooled"]
                 .to("cpu", torch.float16).float() for s in range(0, len(images), batch_size)]
    finally:
        encoder.train(was_training)
    return torch.cat(parts) if parts else torch.zeros(0, encoder.feature_dim)
