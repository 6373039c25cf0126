"""A CLIP model (image tower + text tower) as a zero-shot scorer, whatever its source.

    clip = load_zero_shot_clip("runs/pretrain/clip")           # `medvqa pretrain`'s OUT/clip
    images = clip.image_embeddings(paths_or_arrays)            # (N, E), L2-normalised, through the feature cache
    texts = clip.text_embeddings(["a CT image", "an MRI image"])   # (T, E), L2-normalised
    probs = (clip.logit_scale * images @ texts.T).softmax(-1)

Sources: `medvqa pretrain`'s OUT/clip, a Hugging Face `CLIPModel` folder or hub id (PubMedCLIP's
`flaviagiammarino/pubmed-clip-vit-base-patch32`), or any encoder spelling whose tower keeps its text
side (`hf-hub:` BiomedCLIP, `local-dir:`, `open_clip:`, OpenAI-format `.pt`/`.pth` files such as
PubMedCLIP's). Image embeddings are computed from the image tower's pooled features as the feature
cache stores them (float16), so a frozen tower encodes each image once across every evaluation, and
the linear probe of the same tower reads the same cache.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from encoders import ImageEncoder
from vqa.errors import DataError

log = logging.getLogger(__name__)
ENCODER_PREFIXES = ("hf-hub:", "local-dir:", "open_clip:")


@dataclass
class ZeroShotCLIP:
    name: str
    image_encoder: ImageEncoder
    project: Callable[[Tensor], Tensor]  # pooled image features (B, D) -> image embeddings (B, E)
    encode_text: Callable[[list[str]], Tensor]  # texts -> text embeddings (T, E)
    logit_scale: float  # exp(t) of the model: turns cosine similarities into softmax logits
    device: torch.device

    @torch.no_grad()
    def image_embeddings(self, images: Sequence, cache_dir: str | Path | None = None,
                         progress: bool = True) -> Tensor:
        """(N, E) float32 L2-normalised embeddings of `images`, from the feature cache's pooled features."""
        from vqa.features import feature_table

        if not len(images):
            return torch.zeros(0, 0)
        pooled = feature_table(self.image_encoder, images, cache_dir, device=self.device, progress=progress)["pooled"]
        out = [self.project(pooled[s:s + 1024].float().to(self.device)).float().cpu()
               for s in range(0, len(pooled), 1024)]
        return F.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str], batch_size: int = 256) -> Tensor:
        """(T, E) float32 L2-normalised embeddings of `texts`."""
        parts = [self.encode_text(list(texts[s:s + batch_size])).float().cpu()
                 for s in range(0, len(texts), batch_size)]
        return F.normalize(torch.cat(parts), dim=-1) if parts else torch.zeros(0, 0)


def _from_pretrain_model(model, name: str, device: torch.device) -> ZeroShotCLIP:
    from .evaluate import embed_texts

    model = model.to(device).eval()
    return ZeroShotCLIP(name=name, image_encoder=model.image_encoder, project=model.image_proj,
                        encode_text=lambda texts: embed_texts(model, texts, device),
                        logit_scale=float(model.scale().detach()), device=device)


def _from_encoder(source: str, device: torch.device) -> ZeroShotCLIP:
    """An encoder loaded from its source with its text side (open_clip towers, OpenAI-format CLIP files)."""
    from encoders import create_encoder

    encoder = create_encoder(source).to(device).eval()
    if not hasattr(encoder, "text_tower"):
        raise DataError(f"{source}: an image tower without a text side ({type(encoder).__name__}); zero-shot needs "
                        "a CLIP model: `medvqa pretrain`'s OUT/clip, a CLIPModel folder or hub id, or an open_clip "
                        "source (hf-hub:, local-dir:, open_clip:, an OpenAI-format .pt file)")
    text = encoder.text_tower()  # a DataError naming the source when the text side was not loaded
    text.model.to(device).eval()
    scale = getattr(text.model, "logit_scale", None)
    logit_scale = float(scale.detach().exp()) if scale is not None else 100.0
    # the pooled vector of these towers is already the projected CLIP image embedding
    return ZeroShotCLIP(name=source, image_encoder=encoder, project=lambda pooled: pooled,
                        encode_text=text.encode, logit_scale=min(logit_scale, 100.0), device=device)


def load_zero_shot_clip(source: str | Path, device: torch.device | str = "cpu") -> ZeroShotCLIP:
    """A CLIP model from `source` (see the module docstring) on `device`, in eval mode."""
    from .model import load_clip_model

    device = torch.device(device)
    key = str(source)
    if key.startswith(ENCODER_PREFIXES) or Path(key).expanduser().is_file():
        return _from_encoder(key, device)
    return _from_pretrain_model(load_clip_model(key), key, device)
