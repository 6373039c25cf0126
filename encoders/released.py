"""Released CLIP checkpoint files: OpenAI's state-dict format (PubMedCLIP's RN50/RN50x4/ViT-B/32) and PMC-CLIP.

    create_encoder("PubMedCLIP_ViT32.pth")            # any OpenAI-format CLIP file (the format is read from its keys)
    create_encoder("ViT-B-32.pt")                      # OpenAI's own TorchScript archive: tensors read safely
    create_encoder("checkpoint.pt")                    # PMC-CLIP's training checkpoint (module.visual.* ...)
    create_encoder("image_encoder(resnet50).pth")      # PMC-CLIP's extracted image encoder (bare ModifiedResNet)

OpenAI's format is the CLIP model's own `state_dict()`: `visual.*` (a ViT: conv1, class_embedding,
positional_embedding, ln_pre, transformer.resblocks.N.*, ln_post, proj; or a ModifiedResNet: conv1..3,
bn1..3, layer1..4, attnpool.*), `transformer.resblocks.N.*`, `token_embedding.weight`,
`positional_embedding`, `ln_final.*`, `text_projection`, `logit_scale`; open_clip's CLIP uses the same
names. The architecture is inferred from the tensors as OpenAI's `build_model` does (ViT width, layers,
patch and image size; ResNet block counts and width; embed dim; text width, layers, context, vocabulary;
64-wide attention heads; QuickGELU). PubMedCLIP's files wrap it as {"state_dict": ..., "best_epoch", ...}.

PMC-CLIP (WeixiongLin/PMC-CLIP, config RN50_fusion4): a ModifiedResNet-50 (layers 3-4-6-3, width 64,
224 px) with attention pooling to embed_dim 768, trained with heads = width * 32 // 64 = 32 (its
CLIPVisionCfg.head_width default); pass heads=8 to match notebooks that rebuild it with 8 heads. Its
training checkpoint is {"epoch", "name", "state_dict" (DDP: "module." prefix), "optimizer"}, the image tower
under `visual.`; the text side (PubMedBERT `text_encoder.*`, `text_projection`, `fusion_module.*`,
`mlm_projection`) is not loaded. Preprocessing (both): OpenAI's CLIP mean/std; the sources resize the short
side and centre-crop, medvqa resizes to a square (see encoders.open_clip_tower).
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from torch import Tensor

from ._errors import DataError
from ._weights import read_weights
from .open_clip_tower import OpenCLIPEncoder, encoder_from_weights

logger = logging.getLogger(__name__)

PMC_CLIP_EMBED_DIM = 768
FORMATS = {  # name -> what it is; `detect_format` returns one of these
    "openai-clip": "OpenAI CLIP state dict (visual.*, transformer.*, token_embedding.weight, ...): PubMedCLIP, OpenAI",
    "openai-visual": "an OpenAI CLIP image tower alone (conv1.*, transformer.* or layer1.*, attnpool.*)",
    "pmc-clip": "PMC-CLIP training checkpoint (state_dict with module.visual.*, module.text_encoder.*, ...)",
}


def detect_format(state: dict[str, Tensor]) -> str | None:
    """Which released layout a flat state dict has (None: none we know)."""
    keys = set(state)
    if "visual.conv1.weight" in keys and any(k.startswith(("text_encoder.", "fusion_module.")) for k in keys):
        return "pmc-clip"
    if "visual.conv1.weight" in keys and "token_embedding.weight" in keys and "text_projection" in keys:
        return "openai-clip"
    if "conv1.weight" in keys and ("attnpool.c_proj.weight" in keys or "class_embedding" in keys):
        return "openai-visual"
    return None


def encoder_from_file(path: str | os.PathLike, heads: int | None = None, **kwargs: Any) -> OpenCLIPEncoder:
    """`create_encoder(<weights file>)`: the format is recognised from the tensor names."""
    if kwargs:
        raise TypeError(f"create_encoder({os.fspath(path)!r}) takes only heads= (got {sorted(kwargs)})")
    path = Path(path)
    state = read_weights(path)
    fmt = detect_format(state)
    if fmt is None:
        raise DataError(f"{path}: not a weights layout medvqa recognises ({len(state)} tensors, e.g. "
                        f"{sorted(state)[:4]}); known: {'; '.join(FORMATS.values())}. An open_clip checkpoint of "
                        "another architecture loads with create_encoder('open_clip:<arch>', pretrained=FILE)")
    if fmt == "pmc-clip":
        return pmc_clip_encoder(state, str(path), heads)
    if fmt == "openai-visual" and "attnpool.c_proj.weight" in state and \
            state["attnpool.c_proj.weight"].shape[0] == PMC_CLIP_EMBED_DIM:
        return pmc_clip_encoder({f"visual.{k}": v for k, v in state.items()}, str(path), heads)
    return openai_clip_encoder(state, str(path), heads)


def openai_clip_encoder(state: dict[str, Tensor], source: str, heads: int | None = None) -> OpenCLIPEncoder:
    """An OpenAI-format CLIP (whole model, or its image tower alone) as an encoder; text tower kept if present."""
    if "visual.conv1.weight" not in state:
        state = {f"visual.{k}": v for k, v in state.items()}  # the image tower alone
    cfg = openai_model_cfg(state, heads)
    # the layout names no activation: open_clip's own checkpoints share it, and most (LAION's) trained with GELU
    logger.info("%s: read as OpenAI's CLIP (QuickGELU, as OpenAI and PubMedCLIP trained); a checkpoint trained with "
                "GELU in this layout loads right as create_encoder('open_clip:<arch>', pretrained=FILE)", source)
    return encoder_from_weights(cfg, state, source, with_text="token_embedding.weight" in state)


def pmc_clip_encoder(state: dict[str, Tensor], source: str, heads: int | None = None) -> OpenCLIPEncoder:
    """PMC-CLIP's image tower (ModifiedResNet with attention pooling, embed 768) from its keys."""
    visual = {k: v for k, v in state.items() if k.startswith("visual.")}
    if "visual.attnpool.c_proj.weight" not in visual:
        raise DataError(f"{source}: no PMC-CLIP ResNet image tower (visual.attnpool.*) in this checkpoint")
    cfg = {"embed_dim": int(visual["visual.attnpool.c_proj.weight"].shape[0]),
           "vision_cfg": _resnet_vision_cfg(visual, source, heads), "quick_gelu": False}
    return encoder_from_weights(cfg, visual, source, with_text=False, name=source)


def openai_model_cfg(state: dict[str, Tensor], heads: int | None = None) -> dict[str, Any]:
    """open_clip's model config for an OpenAI-format state dict, inferred from tensor shapes and names."""
    if "visual.proj" in state:  # a ViT image tower
        width, patch = int(state["visual.conv1.weight"].shape[0]), int(state["visual.conv1.weight"].shape[-1])
        grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        vision = {"image_size": patch * grid, "layers": _count(state, "visual.transformer.resblocks."),
                  "width": width, "patch_size": patch, "head_width": width // heads if heads else 64}
        embed = int(state["visual.proj"].shape[1])
    else:
        vision = _resnet_vision_cfg(state, "state dict", heads)
        embed = int(state["visual.attnpool.c_proj.weight"].shape[0])
    cfg: dict[str, Any] = {"embed_dim": embed, "quick_gelu": True, "vision_cfg": vision}
    if "token_embedding.weight" in state:
        text_width = int(state["ln_final.weight"].shape[0])
        cfg["embed_dim"] = int(state["text_projection"].shape[1])
        cfg["text_cfg"] = {"context_length": int(state["positional_embedding"].shape[0]),
                           "vocab_size": int(state["token_embedding.weight"].shape[0]), "width": text_width,
                           "heads": max(text_width // 64, 1), "layers": _count(state, "transformer.resblocks.")}
    else:  # open_clip's CLIP needs a text config to exist; unused for an image tower alone
        cfg["text_cfg"] = {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}
    return cfg


def _resnet_vision_cfg(state: dict[str, Tensor], source: str, heads: int | None) -> dict[str, Any]:
    required = ("visual.layer1.0.conv1.weight", "visual.attnpool.positional_embedding")
    missing = [k for k in required if k not in state]
    if missing:
        raise DataError(f"{source}: not a CLIP ModifiedResNet (missing {missing})")
    width = int(state["visual.layer1.0.conv1.weight"].shape[0])
    side = round((state["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
    layers = [_count(state, f"visual.layer{i}.") for i in range(1, 5)]
    # heads = width * 32 // head_width in open_clip; OpenAI and PMC-CLIP trained with 64-wide heads
    return {"image_size": side * 32, "layers": layers, "width": width,
            "head_width": width * 32 // heads if heads else 64}


def _count(state: dict[str, Tensor], prefix: str) -> int:
    """How many numbered blocks sit under `prefix` (e.g. transformer.resblocks.N.*)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in state for m in [pattern.match(k)] if m})
