"""A CLIP model around any image tower of `encoders` and any text tower of `encoders.text`.

    model = CLIPPretrainModel(create_encoder("vit-tiny"), create_text_tower("bert-tiny", captions=caps),
                              ContrastiveConfig(embed_dim=256))
    out = model({"pixels": x, "input_ids": ids, "attention_mask": mask})
    # {"image_embeds": (B, E), "text_embeds": (B, E), "logit_scale": ()}   (+ "mlm_logits" (B, L, V) when
    #  the batch has "mlm_input_ids"); embeddings are L2-normalised, logit_scale is exp(t), clamped

Saved as a folder: `config.json` (both towers' configs, so it rebuilds offline),
`model.safetensors` and the tokenizer files; when both towers are Hugging Face
CLIP ones the folder is a plain `transformers.CLIPModel` checkpoint instead
(`CLIPModel.from_pretrained(folder)`), plus the tokenizer and a
`preprocessor_config.json` with the image size, mean and std.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from encoders import CLIPVisionEncoder, ImageEncoder
from encoders.clip import hub_preprocessor_stats, preprocessor_stats
from encoders.text import TextTower, load_tokenizer, save_tokenizer
from vqa.errors import DataError
from vqa.io import atomic_dir, atomic_write_safetensors, read_json

log = logging.getLogger(__name__)

FORMAT_NAME = "medvqa-clip"
FORMAT_VERSION = 1
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


@dataclass
class ContrastiveConfig:
    embed_dim: int = 256  # the shared image-text embedding
    init_temperature: float = 0.07  # CLIP: logit_scale = log(1 / 0.07)
    max_logit_scale: float = 100.0  # CLIP clamps exp(logit_scale) at 100


class CLIPPretrainModel(nn.Module):
    def __init__(self, image_encoder: ImageEncoder, text: TextTower, config: ContrastiveConfig):
        super().__init__()
        self.image_encoder, self.text, self.config = image_encoder, text, config
        self.image_proj = nn.Linear(image_encoder.feature_dim, config.embed_dim, bias=False)
        self.text_proj = nn.Linear(text.hidden_size, config.embed_dim, bias=False)
        nn.init.normal_(self.image_proj.weight, std=image_encoder.feature_dim ** -0.5)
        nn.init.normal_(self.text_proj.weight, std=text.hidden_size ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.init_temperature)))

    # -- encoding ----------------------------------------------------------------------------------------------
    def encode_image(self, pixels: Tensor) -> Tensor:
        pooled = self.image_encoder.forward_features(pixels)["pooled"]  # (B, D_img)
        return F.normalize(self.image_proj(pooled).float(), dim=-1)  # (B, E)

    def text_features(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The text tower's pooled output before projection (B, D_txt); cacheable when the tower is frozen."""
        return self.text(input_ids, attention_mask)["pooled"]

    def project_text(self, pooled: Tensor) -> Tensor:
        return F.normalize(self.text_proj(pooled).float(), dim=-1)  # (B, E)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.project_text(self.text_features(input_ids, attention_mask))

    def scale(self) -> Tensor:
        # capped at max_logit_scale with the whole gradient kept: at the cap (where OpenAI's checkpoints start, and
        # where clamp_logit_scale_ holds a scale that wants to grow) the loss can still lower it, as in CLIP and
        # open_clip, which clamp only after each step; a clamp here would pass no gradient there
        excess = (self.logit_scale - math.log(self.config.max_logit_scale)).clamp(min=0.0).detach()
        return (self.logit_scale - excess).exp()

    def channels_last_(self) -> "CLIPPretrainModel":
        """NHWC weights for the image tower's convolutions (~12 % faster ResNet-50 training steps on the CPU here)."""
        self.image_encoder.channels_last_()
        return self

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """After each optimizer step, as CLIP does: 0 <= logit_scale <= log(max)."""
        self.logit_scale.clamp_(0.0, math.log(self.config.max_logit_scale))

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """batch: "pixels" (B, C, S, S); text as "input_ids" + "attention_mask" (B, L) or, for a frozen tower,
        its cached "text_features" (B, D_txt); optional "mlm_input_ids" (B, L), masked, for the MLM head."""
        if "text_features" in batch:
            text = self.project_text(batch["text_features"])
        else:
            text = self.encode_text(batch["input_ids"], batch["attention_mask"])
        out = {"image_embeds": self.encode_image(batch["pixels"]), "text_embeds": text, "logit_scale": self.scale()}
        if "mlm_input_ids" in batch:
            if self.text.mlm_head is None:
                raise ValueError("the batch asks for MLM logits but the text tower has no MLM head")
            tokens = self.text(batch["mlm_input_ids"], batch["attention_mask"])["tokens"]  # (B, L, D)
            out["mlm_logits"] = self.text.mlm_head(tokens)  # (B, L, V)
        return out

    # -- persistence -------------------------------------------------------------------------------------------
    @property
    def is_hf_clip(self) -> bool:
        return isinstance(self.image_encoder, CLIPVisionEncoder) and self.text.kind == "clip"

    def export_config(self) -> dict[str, Any]:
        return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                "image_encoder": self.image_encoder.export_config(), "text_tower": self.text.export_config(),
                "contrastive": dataclasses.asdict(self.config)}

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """A Hugging Face CLIPModel folder when both towers are CLIP ones, else our own format (atomic)."""
        directory = Path(directory)
        with atomic_dir(directory, overwrite=True) as tmp:
            if self.is_hf_clip:
                self.to_hf_clip().save_pretrained(str(tmp))
                _write_preprocessor(self.image_encoder, tmp)
            else:
                state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
                atomic_write_safetensors(tmp / WEIGHTS_NAME, state, metadata={"format": "pt"})
                (tmp / CONFIG_NAME).write_text(json.dumps(self.export_config(), indent=2) + "\n")
            save_tokenizer(self.text.tokenizer, tmp)
        log.info("saved the %s model to %s", "CLIPModel" if self.is_hf_clip else FORMAT_NAME, directory)
        return directory

    def to_hf_clip(self):
        """The same weights as a `transformers.CLIPModel` (both towers must be CLIP ones)."""
        from transformers import CLIPConfig, CLIPModel

        if not self.is_hf_clip:
            raise ValueError("a CLIPModel needs a CLIP vision tower and a CLIP text tower")
        config = CLIPConfig(text_config=self.text.model.config.to_dict(),
                            vision_config=self.image_encoder.hf_vision_config().to_dict(),
                            projection_dim=self.config.embed_dim,
                            logit_scale_init_value=float(self.logit_scale.detach()))
        clip = CLIPModel(config)
        _tower(clip.vision_model).load_state_dict(self.image_encoder.vision_model.state_dict())
        _text_tower(clip.text_model).load_state_dict(self.text.model.state_dict())
        clip.visual_projection.load_state_dict(self.image_proj.state_dict())
        clip.text_projection.load_state_dict(self.text_proj.state_dict())
        with torch.no_grad():
            clip.logit_scale.copy_(self.logit_scale.detach())
        return clip.eval()

    @classmethod
    def from_hf_clip(cls, clip, tokenizer, name: str = "clip", mean=None, std=None) -> "CLIPPretrainModel":
        """Wrap an in-memory `CLIPModel` (modules shared): both towers, projections and logit scale."""
        extra = {"mean": tuple(mean), "std": tuple(std)} if mean is not None else {}
        image = CLIPVisionEncoder.from_clip_model(clip, name=name, **extra)
        text = TextTower(_text_tower(clip.text_model), tokenizer, "clip", "eos", name)
        model = cls(image, text, ContrastiveConfig(embed_dim=clip.config.projection_dim))
        model.image_proj, model.text_proj = clip.visual_projection, clip.text_projection
        with torch.no_grad():
            model.logit_scale.copy_(clip.logit_scale.detach())
        return model


def load_clip_model(source: str | os.PathLike) -> CLIPPretrainModel:
    """Load our folder, a local Hugging Face CLIPModel folder, or a CLIP hub id (online or cached)."""
    path = Path(source)
    config_file = path / CONFIG_NAME
    if not path.exists() and (path.is_absolute() or str(source).startswith((".", "~")) or str(source).count("/") != 1):
        raise DataError(f"CLIP model folder not found: {source} (nor a hub id 'org/name')")
    if path.is_dir() and not config_file.is_file():
        raise DataError(f"{path}: no {CONFIG_NAME}; expected a folder written by `medvqa pretrain` (OUT/clip)")
    meta = read_json(config_file) if config_file.is_file() else {"model_type": "clip"}
    if not isinstance(meta, dict):
        raise DataError(f"{config_file}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") == FORMAT_NAME:
        return _load_own(path, meta)
    if meta.get("model_type") != "clip":
        raise DataError(f"{config_file}: neither a {FORMAT_NAME} folder nor a Hugging Face CLIP model "
                        f"(model_type={meta.get('model_type')!r})")
    from transformers import AutoTokenizer, CLIPModel

    from encoders._registry import require_safetensors

    if path.is_dir():
        require_safetensors(path)
    try:
        clip = CLIPModel.from_pretrained(str(source), use_safetensors=True).float()
        tokenizer = AutoTokenizer.from_pretrained(str(source))
        # the repository's own statistics, as `create_encoder` reads them for the same id (BiomedCLIP-style towers
        # normalise otherwise than OpenAI's)
        mean, std = preprocessor_stats(path) if path.is_dir() else hub_preprocessor_stats(str(source))
    except OSError as e:
        raise DataError(f"cannot load CLIP model {str(source)!r} (offline and not cached, or not a CLIP "
                        f"folder): {str(e).splitlines()[0]}") from None
    return CLIPPretrainModel.from_hf_clip(clip, tokenizer, name=str(source), mean=mean, std=std)


def _load_own(path: Path, meta: dict) -> CLIPPretrainModel:
    image = _image_encoder_from_config(meta["image_encoder"])
    text = TextTower.from_config(meta["text_tower"], load_tokenizer(path))
    model = CLIPPretrainModel(image, text, ContrastiveConfig(**meta["contrastive"]))
    try:
        model.load_state_dict(load_file(str(path / WEIGHTS_NAME)), strict=True)
    except RuntimeError as e:
        raise DataError(f"{path / WEIGHTS_NAME}: weights do not match {CONFIG_NAME} ({e})") from None
    return model


def _image_encoder_from_config(meta: dict) -> ImageEncoder:
    from encoders import encoder_from_config

    try:
        return encoder_from_config(meta, "image_encoder")
    except ValueError as e:
        raise DataError(str(e)) from None


def _tower(module: nn.Module) -> nn.Module:
    return getattr(module, "vision_model", module)


def _text_tower(module: nn.Module) -> nn.Module:
    inner = getattr(module, "text_model", None)
    return inner if inner is not None and not hasattr(module, "final_layer_norm") else module


def _write_preprocessor(encoder: ImageEncoder, folder: Path) -> None:
    """What CLIPImageProcessor reads, describing our preprocessing: a square resize, no crop."""
    side = encoder.image_size
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"height": side, "width": side},
        "resample": 3, "do_center_crop": False, "crop_size": {"height": side, "width": side},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(encoder.mean),
        "image_std": list(encoder.std), "do_convert_rgb": True}, indent=2) + "\n")


