"""Image inputs for the heads: cached encoder features (frozen) or preprocessed pixels (fine-tuning)."""
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

    Rows follow `images`. Missing images are encoded into the on-disk cache first.
    """
    from encoders import FeatureCache

    folder = cache_folder(encoder, cache_dir)
    cache = FeatureCache.open(folder, encoder)
    hashes = cache.ensure(images, batch_size=batch_size, device=device, progress=progress)
    table = cache.lookup(hashes)
    return {k: v.to(torch.float16) for k, v in table.items()}


@torch.no_grad()
def pixel_table(encoder, images: Sequence, batch_size: int = 64, progress: bool = True) -> torch.Tensor:
    """Preprocessed pixels of `images` (I, C, H, W) float16, for training through the encoder."""
    from encoders import load_image
    from tqdm import tqdm

    chunks = []
    for start in tqdm(range(0, len(images), batch_size), desc="preprocess", disable=not progress):
        batch = [load_image(im) for im in images[start:start + batch_size]]
        chunks.append(encoder.preprocess(batch).to(torch.float16))
    return torch.cat(chunks) if chunks else torch.zeros(0)
