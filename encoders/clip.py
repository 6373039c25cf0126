"""CLIP vision towers from Hugging Face transformers.

grid   = patch tokens after the final LayerNorm, CLS excluded   (B, N, hidden)
pooled = the final-LayerNorm CLS token (HF's `pooler_output`)    (B, hidden)
The CLIP projection (`visual_projection`, hidden -> projection_dim) belongs to
`CLIPModel`, not to the tower; pretraining builds it.

Building a full CLIPModel around a tower (for contrastive pretraining):

    enc = create_encoder("clip-vit-tiny")
    clip = CLIPModel(CLIPConfig(vision_config=enc.hf_vision_config().to_dict(),
                                text_config=..., projection_dim=enc.config.projection_dim))
    clip.vision_model.load_state_dict(enc.vision_model.state_dict())
    ...train...; CLIPVisionEncoder.from_clip_model(clip) or clip.save_pretrained(d) + create_encoder(d)

PubMedCLIP's ViT-B/32 is on the hub in this format as `flaviagiammarino/pubmed-clip-vit-base-patch32`
(registered as `pubmedclip-vit-b32`, pretrained=True); its OpenAI-format .pth files load through
`encoders.released`.

`vision_model` holds the same module type and parameter names as
`CLIPModel.vision_model` in both transformers 4.x and 5.x.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from ._errors import DataError
from ._files import read_json
from ._registry import register_encoder, register_family
from .base import ImageEncoder, set_hf_grad_checkpointing

logger = logging.getLogger(__name__)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSOR_CONFIG = "preprocessor_config.json"  # a Hugging Face checkpoint's image preprocessing


@dataclass
class CLIPEncoderConfig:
    """A CLIP vision tower; the architecture fields mirror `transformers.CLIPVisionConfig`.
    Defaults are ViT-B/32 (openai/clip-vit-base-patch32)."""

    image_size: int = 224
    patch_size: int = 32
    hidden_size: int = 768  # D of grid and pooled
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    projection_dim: int = 512  # used only when a CLIPModel is built around the tower
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    in_chans: int = 3
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    hub_id: str | None = None  # where pretrained weights come from (provenance only)

    def to_hf(self) -> CLIPVisionConfig:
        return CLIPVisionConfig(
            image_size=self.image_size, patch_size=self.patch_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, projection_dim=self.projection_dim,
            hidden_act=self.hidden_act, layer_norm_eps=self.layer_norm_eps, num_channels=self.in_chans)

    @classmethod
    def from_hf(cls, hf: CLIPVisionConfig, **extra: Any) -> "CLIPEncoderConfig":
        return cls(image_size=hf.image_size, patch_size=hf.patch_size, hidden_size=hf.hidden_size,
                   intermediate_size=hf.intermediate_size, num_hidden_layers=hf.num_hidden_layers,
                   num_attention_heads=hf.num_attention_heads, projection_dim=hf.projection_dim,
                   hidden_act=hf.hidden_act, layer_norm_eps=hf.layer_norm_eps,
                   in_chans=hf.num_channels, **extra)


def _tower(model: nn.Module) -> nn.Module:
    """transformers 4.x wraps the tower in `.vision_model`; 5.x's CLIPVisionModel is the tower."""
    return getattr(model, "vision_model", model)


@register_family
class CLIPVisionEncoder(ImageEncoder):
    family = "hf_clip"
    config_class = CLIPEncoderConfig

    def __init__(self, config: CLIPEncoderConfig, name: str = "clip", vision_model: nn.Module | None = None):
        super().__init__(config, name)
        self.vision_model = vision_model if vision_model is not None else _tower(CLIPVisionModel(config.to_hf()))
        side = config.image_size // config.patch_size
        self.grid_size = (side, side)
        self.feature_dim = config.hidden_size

    def forward_features(self, pixels: Tensor) -> dict[str, Tensor]:
        out = self.vision_model(pixel_values=pixels)
        tokens = out.last_hidden_state  # (B, 1 + N, D), before the final LayerNorm
        grid = self.vision_model.post_layernorm(tokens[:, 1:])  # (B, N, D)
        return {"grid": grid, "pooled": out.pooler_output}  # pooled: (B, D)

    def _set_grad_checkpointing(self, enable: bool) -> None:
        set_hf_grad_checkpointing(self.vision_model, enable)

    def hf_vision_config(self) -> CLIPVisionConfig:
        """The transformers config of this tower (to build a CLIPModel around it)."""
        return self.config.to_hf()

    @classmethod
    def from_clip_model(cls, clip_model: nn.Module, name: str = "clip", **config_extra: Any) -> "CLIPVisionEncoder":
        """Wrap the vision tower of an in-memory `CLIPModel` (modules shared, not copied)."""
        config = CLIPEncoderConfig.from_hf(clip_model.config.vision_config, **config_extra)
        return cls(config, name=name, vision_model=clip_model.vision_model)

    @classmethod
    def from_hf(cls, source: str | os.PathLike, name: str | None = None) -> "CLIPVisionEncoder":
        """Load the vision tower of a Hugging Face CLIP checkpoint: a hub id or a local
        folder written by `CLIPModel.save_pretrained` or `CLIPVisionModel.save_pretrained`."""
        local = Path(source).is_dir()
        try:
            hf_model = CLIPVisionModel.from_pretrained(source, use_safetensors=True)
        except OSError as e:
            if local:
                raise ValueError(f"{source}: not a loadable Hugging Face CLIP folder ({e})") from e
            raise OSError(
                f"cannot load {str(source)!r} from the Hugging Face hub: no network access (or HF_HUB_OFFLINE=1) "
                f"and no copy in the local hub cache. Run once online to cache it, or pass a local folder "
                f"written by CLIPModel.save_pretrained. ({e.__class__.__name__}: {str(e).splitlines()[0]})") from e
        mean, std = preprocessor_stats(Path(source)) if local else hub_preprocessor_stats(str(source))
        config = CLIPEncoderConfig.from_hf(hf_model.config, mean=mean, std=std,
                                           hub_id=None if local else str(source))
        encoder = cls(config, name=name or str(source), vision_model=_tower(hf_model.float()))
        logger.info("loaded CLIP vision tower from %s (D=%d, grid %s)", source, encoder.feature_dim, encoder.grid_size)
        return encoder


def image_stats(cfg: dict, mean_key: str, std_key: str, where: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel normalisation (`mean_key`, `std_key`) of a preprocessing config, OpenAI's where absent;
    anything but three numbers each (std positive) is a DataError naming `where` and the field."""
    stats = []
    for key, default in ((mean_key, OPENAI_CLIP_MEAN), (std_key, OPENAI_CLIP_STD)):
        value = cfg.get(key, default)
        if not (isinstance(value, (list, tuple)) and len(value) == 3
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            raise DataError(f"{where}: {key!r} is {value!r}; expected three numbers, one per RGB channel")
        stats.append(tuple(float(v) for v in value))
    if min(stats[1]) <= 0:
        raise DataError(f"{where}: {std_key!r} is {list(stats[1])}; a standard deviation must be positive")
    return stats[0], stats[1]


def preprocessor_stats(folder: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """image_mean/image_std from a Hugging Face folder's preprocessor_config.json, else OpenAI's."""
    path = Path(folder) / PREPROCESSOR_CONFIG
    cfg = read_json(path) if path.is_file() else {}
    if not isinstance(cfg, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return image_stats(cfg, "image_mean", "image_std", str(path))


def hub_preprocessor_stats(repo_id: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """image_mean/image_std from a Hub repository's preprocessor_config.json (fetched once, then read from the hub
    cache), else OpenAI's: a repository without one, or one cached offline without it, which is said."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    try:
        path = hf_hub_download(repo_id, PREPROCESSOR_CONFIG)
    except LocalEntryNotFoundError:  # offline (a subclass of the next): the weights were cached without it
        logger.warning("%s: its %s is not in the hub cache and the Hub cannot be reached; normalising with "
                       "OpenAI CLIP's statistics", repo_id, PREPROCESSOR_CONFIG)
        return OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    except EntryNotFoundError:  # the repository has none: CLIPImageProcessor's defaults are OpenAI's
        return OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status is None or status < 500:  # refused (401, 403, 429, ...): said, not saved as if OpenAI's were its
            raise OSError(f"{repo_id}: its {PREPROCESSOR_CONFIG} could not be fetched ({e.__class__.__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else status}); its image statistics are needed") from e
        # the Hub failed (5xx) after serving the weights: keep them, with OpenAI's statistics, said
        logger.warning("%s: its %s could not be fetched (%s); normalising with OpenAI CLIP's statistics", repo_id,
                       PREPROCESSOR_CONFIG, str(e).splitlines()[0] if str(e) else type(e).__name__)
        return OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    return preprocessor_stats(Path(path).parent)


def _create(name: str, config: CLIPEncoderConfig, pretrained: bool, overrides: dict) -> CLIPVisionEncoder:
    if pretrained:
        if not config.hub_id:
            raise ValueError(f"{name!r} has no pretrained weights; use pretrained=False")
        if overrides:
            raise ValueError(f"{name!r}: config overrides {sorted(overrides)} cannot apply to pretrained weights")
        return CLIPVisionEncoder.from_hf(config.hub_id, name=name)
    return CLIPVisionEncoder(dataclasses.replace(config, **overrides), name=name)


@register_encoder("clip-vit-b32", weights="random init; pretrained=True: hub openai/clip-vit-base-patch32")
def clip_vit_b32(pretrained: bool = False, **overrides: Any) -> CLIPVisionEncoder:
    """OpenAI CLIP ViT-B/32 (random init offline; pretrained=True loads the hub weights)."""
    return _create("clip-vit-b32", CLIPEncoderConfig(hub_id="openai/clip-vit-base-patch32"), pretrained, overrides)


@register_encoder("clip-vit-b16", weights="random init; pretrained=True: hub openai/clip-vit-base-patch16")
def clip_vit_b16(pretrained: bool = False, **overrides: Any) -> CLIPVisionEncoder:
    """OpenAI CLIP ViT-B/16 (grid 14x14)."""
    config = CLIPEncoderConfig(patch_size=16, hub_id="openai/clip-vit-base-patch16")
    return _create("clip-vit-b16", config, pretrained, overrides)


@register_encoder("pubmedclip-vit-b32",
                  weights="random init; pretrained=True: hub flaviagiammarino/pubmed-clip-vit-base-patch32")
def pubmedclip_vit_b32(pretrained: bool = False, **overrides: Any) -> CLIPVisionEncoder:
    """PubMedCLIP ViT-B/32 (CLIP fine-tuned on ROCO), the best PubMedCLIP tower."""
    config = CLIPEncoderConfig(hub_id="flaviagiammarino/pubmed-clip-vit-base-patch32")
    return _create("pubmedclip-vit-b32", config, pretrained, overrides)


@register_encoder("clip-vit-tiny")
def clip_vit_tiny(pretrained: bool = False, **overrides: Any) -> CLIPVisionEncoder:
    """A tiny CLIP ViT for tests: 64 px, patch 16 (grid 4x4), D=64, 2 layers."""
    config = CLIPEncoderConfig(image_size=64, patch_size=16, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=2, projection_dim=32)
    return _create("clip-vit-tiny", config, pretrained, overrides)
