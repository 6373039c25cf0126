"""open_clip image towers (BiomedCLIP and every open_clip model), in open_clip's own formats.

    create_encoder("hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224")   # online or hub cache
    create_encoder("local-dir:path/to/folder")        # open_clip_config.json + open_clip_model.safetensors
    create_encoder("open_clip:ViT-B-32", pretrained="laion2b_s34b_b79k")   # a built-in arch + tag (online)
    create_encoder("open_clip:RN50", pretrained="path/to/weights.safetensors")   # ... or + a weights file
    create_encoder("open_clip:ViT-B-32")              # random init (the untrained control)

pooled = the CLIP image embedding (`encode_image`, projected, not normalised)     (B, embed_dim)
grid, by tower kind, in the same embedding space (D = embed_dim):
  ViT (open_clip VisionTransformer): the patch tokens after the final LayerNorm (`ln_post`), CLS
      excluded, projected by `proj`: the same two steps the CLS token takes to become the embedding,
      so each region is comparable with `pooled` and with text embeddings;
  ModifiedResNet (OpenAI RN50/RN50x4, PMC-CLIP): the last feature map before attention pooling,
      flattened, plus the pool's positional embedding and through its value and output projections
      (`c_proj(v_proj(.))`): what each position contributes to the pooled embedding;
  timm trunk (BiomedCLIP's ViT-B/16): the trunk's final-norm tokens, prefix tokens excluded,
      through open_clip's projection head.
Weights: safetensors preferred; a pickle is read with `torch.load(weights_only=True)` and refused if it
holds anything else (`encoders._weights`). The saved folder (`save_pretrained`) keeps the image tower only
and rebuilds it from open_clip's model config offline; `text_tower()` reaches the text side of a model
loaded from its source (for retrieval and zero-shot).
Preprocessing: open_clip resizes the short side and centre-crops (bicubic); medvqa's `preprocess`
resizes the whole image to a square (bicubic, no crop), so wide images are squeezed rather than cropped.
Mean/std come from the source's preprocess config (OpenAI's CLIP statistics for OpenAI, BiomedCLIP, PMC-CLIP).
"""
from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._errors import DataError
from ._files import read_json
from ._registry import register_family
from ._weights import read_weights
from .base import ImageEncoder
from .clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, image_stats

logger = logging.getLogger(__name__)
OPEN_CLIP_CONFIG = "open_clip_config.json"
# open_clip's own preference when a folder holds several weight files (factory._find_checkpoint_in_dir)
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "model.safetensors",
                "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth", "pytorch_model.bin", "model.pth")


@dataclass
class OpenCLIPEncoderConfig:
    """An open_clip image tower: `model_cfg` is open_clip's model config (embed_dim, vision_cfg, text_cfg,
    quick_gelu, ...); its vision part rebuilds the tower offline."""

    model_cfg: dict[str, Any] = field(default_factory=dict)
    image_size: int = 224
    in_chans: int = 3  # open_clip towers take RGB
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    source: str | None = None  # where the weights came from (provenance; also what text_tower() reloads)


def _open_clip():
    try:
        import open_clip
    except ImportError:  # pragma: no cover - open_clip is a dependency, but keep the message useful
        raise ImportError("this encoder needs open_clip: pip install 'open_clip_torch>=3.0'") from None
    return open_clip


def _tower_kind(visual: nn.Module) -> str:
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import VisionTransformer

    if isinstance(visual, VisionTransformer):
        if visual.attn_pool is not None:
            raise DataError("open_clip ViT towers with attentional pooling (CoCa) have no patch grid; not supported")
        return "vit"
    if isinstance(visual, ModifiedResNet):
        return "resnet"
    if isinstance(visual, TimmModel):
        names = dict(visual.head.named_children())
        if "pool" in names or not ({"proj", "mlp"} & set(names)):
            raise DataError("open_clip timm towers need a 'linear' or 'mlp' projection and no attention pool "
                            "(timm_proj / timm_pool in vision_cfg) to give a grid; not supported")
        return "timm"
    raise DataError(f"unsupported open_clip image tower {type(visual).__name__}")


def build_visual(model_cfg: dict[str, Any]) -> nn.Module:
    """open_clip's image tower for `model_cfg`, randomly initialised, never downloading weights."""
    _open_clip()
    from open_clip.model import _build_vision_tower

    vision_cfg = dict(model_cfg["vision_cfg"], timm_model_pretrained=False)
    return _build_vision_tower(model_cfg["embed_dim"], vision_cfg, quick_gelu=model_cfg.get("quick_gelu", False))


@register_family
class OpenCLIPEncoder(ImageEncoder):
    family = "open_clip"
    config_class = OpenCLIPEncoderConfig
    provenance_fields = ("source",)

    def __init__(self, config: OpenCLIPEncoderConfig, name: str = "open_clip", visual: nn.Module | None = None,
                 full_model: nn.Module | None = None):
        config.model_cfg = json.loads(json.dumps(config.model_cfg))  # JSON-normal (tuples -> lists): reloads equal
        super().__init__(config, name)
        self.visual = visual if visual is not None else build_visual(config.model_cfg)
        self.kind = _tower_kind(self.visual)
        self.feature_dim = int(config.model_cfg["embed_dim"])
        self.grid_size = self._grid_size()
        object.__setattr__(self, "_full_model", full_model)  # not a submodule: not saved, not fingerprinted

    def _grid_size(self) -> tuple[int, int]:
        size = self.config.image_size
        if self.kind == "vit":
            return tuple(int(s) for s in self.visual.grid_size)
        if self.kind == "resnet":
            return (size // 32, size // 32)
        patch = getattr(getattr(self.visual.trunk, "patch_embed", None), "grid_size", None)
        if patch:
            return tuple(int(s) for s in patch)
        with torch.no_grad():  # a CNN trunk: measure its output map once
            was = self.visual.training
            feats = self.visual.eval().trunk.forward_features(torch.zeros(1, 3, size, size))
            self.visual.train(was)
        return tuple(int(s) for s in feats.shape[2:]) if feats.ndim == 4 else (1, feats.shape[1])

    def _set_grad_checkpointing(self, enable: bool) -> None:
        if self.kind == "vit":
            self.visual.set_grad_checkpointing(enable)
        elif self.kind == "resnet":  # open_clip's ModifiedResNet accepts the call and does nothing
            if enable:
                raise DataError(f"{self.name}: open_clip's ModifiedResNet (the OpenAI RN towers) has no gradient "
                                "checkpointing")
        else:
            try:
                self.visual.trunk.set_grad_checkpointing(enable)
            except (AssertionError, NotImplementedError) as e:
                raise DataError(f"{self.name}: its timm trunk has no gradient checkpointing "
                                f"({e or type(e).__name__})") from None

    def forward_features(self, pixels: Tensor) -> dict[str, Tensor]:
        if self.kind == "vit":
            # open_clip's own steps (VisionTransformer._embeds/_pool, open_clip >= 3.0), so pooled is
            # exactly encode_image; forward() would not return the tokens without mutating the tower
            v = self.visual
            x = v.transformer(v._embeds(pixels))  # (B, 1 + N, width)
            pooled, tokens = v._pool(x)  # tokens: (B, N, width), after ln_post in every non-attn-pool config
            if v.final_ln_after_pool:
                tokens = v.ln_post(tokens)
            return {"grid": tokens @ v.proj, "pooled": pooled @ v.proj}  # (B, N, D), (B, D)
        if self.kind == "resnet":
            v = self.visual
            fmap = v.layer4(v.layer3(v.layer2(v.layer1(v.stem(pixels)))))  # (B, C, h, w)
            pooled = v.attnpool(fmap)  # (B, D)
            pool = v.attnpool
            tokens = fmap.flatten(2).transpose(1, 2) + pool.positional_embedding[1:].to(fmap.dtype)  # (B, N, C)
            grid = F.linear(F.linear(tokens, pool.v_proj.weight, pool.v_proj.bias), pool.c_proj.weight,
                            pool.c_proj.bias)  # (B, N, D)
            return {"grid": grid, "pooled": pooled}
        trunk = self.visual.trunk
        feats = trunk.forward_features(pixels)
        pooled = self.visual.head(trunk.forward_head(feats))  # (B, D), as TimmModel.forward
        if feats.ndim == 4:
            tokens = feats.flatten(2).transpose(1, 2)  # (B, h*w, C)
        else:
            tokens = feats[:, getattr(trunk, "num_prefix_tokens", 1):]  # (B, N, C)
        return {"grid": self.visual.head(tokens), "pooled": pooled}

    def text_tower(self) -> "OpenCLIPText":
        """The text side of the CLIP model this tower was loaded with (zero-shot, retrieval).

        Available for encoders loaded from their source (hf-hub:, local-dir:, open_clip:, an OpenAI-format
        file); a medvqa folder keeps the image tower only, so load the source again for text."""
        model = self.__dict__.get("_full_model")
        if model is None:
            raise DataError(f"{self.name}: no text tower here (a saved medvqa encoder keeps the image tower "
                            f"only); load the source ({self.config.source or 'unknown'}) with create_encoder")
        return OpenCLIPText(model, self.config)


@dataclass
class OpenCLIPText:
    """A CLIP model's text side: `encode(texts)` gives the projected text embeddings (B, embed_dim).

    The tokenizer is made on first use (an HF tokenizer, e.g. BiomedCLIP's, may need the hub)."""

    model: nn.Module  # the whole open_clip model (its `visual` is the encoder's own tower)
    config: OpenCLIPEncoderConfig
    tokenizer: Any = None

    @torch.no_grad()
    def encode(self, texts: list[str]) -> Tensor:
        if self.tokenizer is None:
            self.tokenizer = _tokenizer(self.config)
        device = next(self.model.parameters()).device
        return self.model.encode_text(self.tokenizer(texts).to(device))


def _tokenizer(config: OpenCLIPEncoderConfig):
    open_clip = _open_clip()
    context = config.model_cfg.get("text_cfg", {}).get("context_length", 77)
    source = config.source or ""
    if source.startswith(("hf-hub:", "local-dir:")):
        return open_clip.get_tokenizer(source)
    if source.startswith("open_clip:"):
        return open_clip.get_tokenizer(source[len("open_clip:"):].split("/")[0])
    return open_clip.SimpleTokenizer(context_length=context)  # OpenAI's BPE (OpenAI-format files)


# -- building from a source -------------------------------------------------------------------------------------------

def encoder_from_weights(model_cfg: dict, state: dict[str, Tensor], source: str, *, name: str | None = None,
                         mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, with_text: bool = True) -> OpenCLIPEncoder:
    """An encoder from open_clip's model config and a full-model state dict (`visual.*`, text keys, ...).

    With `with_text` the whole CLIP model is built and loaded strictly, so `text_tower()` works; when its
    text side cannot be built here (a Hugging Face text model neither cached nor reachable) the image
    tower alone is loaded and the reason logged."""
    model_cfg = json.loads(json.dumps(model_cfg))
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    full = _full_model(model_cfg, state, source) if with_text else None
    if full is not None:
        visual = full.visual
    else:
        visual = build_visual(model_cfg)
        tower = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
        _load(visual, tower or state, source)
    size = _image_size(model_cfg)
    config = OpenCLIPEncoderConfig(model_cfg=model_cfg, image_size=size, mean=tuple(mean), std=tuple(std),
                                   source=source)
    encoder = OpenCLIPEncoder(config, name=name or source, visual=visual, full_model=full)
    logger.info("loaded open_clip %s tower from %s (D=%d, grid %s)", encoder.kind, source, encoder.feature_dim,
                encoder.grid_size)
    return encoder


def _full_model(model_cfg: dict, state: dict[str, Tensor], source: str) -> nn.Module | None:
    if not any(k.startswith("visual.") for k in state) or not any(not k.startswith("visual.") for k in state):
        return None  # an image-tower-only file
    open_clip = _open_clip()
    cfg = copy.deepcopy(model_cfg)
    cfg["vision_cfg"] = dict(cfg["vision_cfg"], timm_model_pretrained=False)
    text_cfg = cfg.get("text_cfg", {})
    if "hf_model_name" in text_cfg:
        text_cfg["hf_model_pretrained"] = False  # the checkpoint holds the text weights
    custom = cfg.pop("custom_text", False) or "hf_model_name" in text_cfg
    try:
        model = (open_clip.CustomTextCLIP if custom else open_clip.CLIP)(**cfg)
    except Exception as e:  # typically: the HF text model's config is not reachable offline
        logger.warning("%s: text tower not built (%s: %s); image tower only", source, type(e).__name__,
                       str(e).splitlines()[0] if str(e) else "")
        return None
    if "logit_scale" in state:  # a scalar in some checkpoints, shape (1,) in others
        state = dict(state, logit_scale=state["logit_scale"].reshape(model.logit_scale.shape))
    _load(model, state, source)
    return model.eval()


def _load(module: nn.Module, state: dict[str, Tensor], source: str) -> None:
    expected = module.state_dict()
    # buffers some exporters keep and the module recomputes (OpenAI's TorchScript attn_mask, HF position_ids), and
    # the 3 int tensors OpenAI's TorchScript archives hold beside the weights (open_clip drops them too)
    state = {k: v for k, v in state.items() if k in expected or not (
        k.endswith(("attn_mask", "position_ids")) or k in ("input_resolution", "context_length", "vocab_size"))}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise DataError(f"{source}: weights do not match the architecture ({str(e).splitlines()[0]} "
                        f"{_mismatch(expected, state)})") from None


def _mismatch(expected: dict, state: dict) -> str:
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    shapes = [k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape)]
    return f"missing {missing[:3]}, unexpected {unexpected[:3]}, shape differs {sorted(shapes)[:3]}"


def _image_size(model_cfg: dict) -> int:
    size = model_cfg["vision_cfg"].get("image_size", 224)
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def _preprocess_stats(cfg: dict, where: str) -> tuple[tuple, tuple]:
    pre = cfg.get("preprocess_cfg", {})
    if not isinstance(pre, dict):
        raise DataError(f"{where}: 'preprocess_cfg' is {type(pre).__name__}; expected an object")
    return image_stats(pre, "mean", "std", f"{where}: preprocess_cfg")


def from_local_dir(folder: str | os.PathLike, source: str | None = None) -> OpenCLIPEncoder:
    """`local-dir:<folder>`: open_clip_config.json ({"model_cfg", "preprocess_cfg"}) + its weights file."""
    folder = Path(folder).expanduser()
    config_file = folder / OPEN_CLIP_CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder}: no {OPEN_CLIP_CONFIG} (an open_clip local-dir folder holds it and "
                                "the weights, e.g. open_clip_model.safetensors)")
    cfg = read_json(config_file)
    if not isinstance(cfg, dict) or "model_cfg" not in cfg:
        raise DataError(f"{config_file}: no 'model_cfg' (open_clip writes {{'model_cfg', 'preprocess_cfg'}})")
    weights = next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)
    weights = weights or next(iter(sorted(folder.glob("*.safetensors"))), None)
    if weights is None:
        raise DataError(f"{folder}: no weights file (looked for {', '.join(WEIGHT_FILES[:3])}, ...)")
    mean, std = _preprocess_stats(cfg, str(config_file))
    return encoder_from_weights(cfg["model_cfg"], read_weights(weights), source or f"local-dir:{folder}",
                                mean=mean, std=std)


def from_hf_hub(model_id: str, cache_dir: str | None = None) -> OpenCLIPEncoder:
    """`hf-hub:<org>/<name>`: open_clip_config.json and the weights from the Hugging Face hub (or its cache)."""
    from huggingface_hub import hf_hub_download

    def fetch(filename: str) -> str:
        return hf_hub_download(model_id, filename, cache_dir=cache_dir)

    source = f"hf-hub:{model_id}"
    try:
        config_file = fetch(OPEN_CLIP_CONFIG)
    except Exception as e:
        raise OSError(f"cannot load {source!r}: no network access (or HF_HUB_OFFLINE=1) and no copy in the hub "
                      f"cache, or not an open_clip repository ({e.__class__.__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''})") from None
    cfg = read_json(config_file)
    if not isinstance(cfg, dict) or "model_cfg" not in cfg:
        raise DataError(f"{source}: its {OPEN_CLIP_CONFIG} has no 'model_cfg' (not an open_clip repository)")
    weights, errors = None, []
    for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):  # safetensors first
        try:
            weights = fetch(filename)
            break
        except Exception as e:
            errors.append(f"{filename}: {e.__class__.__name__}")
    if weights is None:
        raise OSError(f"{source}: no weights file reachable ({'; '.join(errors)})")
    mean, std = _preprocess_stats(cfg, f"{source}: {OPEN_CLIP_CONFIG}")
    return encoder_from_weights(cfg["model_cfg"], read_weights(weights), source, mean=mean, std=std)


def from_open_clip_name(arch: str, pretrained: str | os.PathLike | bool | None = None,
                        cache_dir: str | None = None) -> OpenCLIPEncoder:
    """`open_clip:<arch>` (a built-in model config) with `pretrained` = a tag, a weights file, or none (random)."""
    open_clip = _open_clip()
    model_cfg = open_clip.get_model_config(arch)
    if model_cfg is None:
        raise ValueError(f"unknown open_clip architecture {arch!r}; known: {', '.join(open_clip.list_models())}")
    if not pretrained:
        config = OpenCLIPEncoderConfig(model_cfg=model_cfg, image_size=_image_size(model_cfg),
                                       source=f"open_clip:{arch}")
        return OpenCLIPEncoder(config, name=f"open_clip:{arch}")
    pretrained = os.fspath(pretrained)
    tag_cfg = open_clip.get_pretrained_cfg(arch, pretrained)
    if tag_cfg:
        try:
            weights = open_clip.download_pretrained(tag_cfg, cache_dir=cache_dir)
        except Exception as e:
            raise OSError(f"cannot fetch open_clip weights {arch}/{pretrained}: no network access (or "
                          f"HF_HUB_OFFLINE=1) and no cached copy ({e.__class__.__name__})") from None
        if tag_cfg.get("quick_gelu"):  # the tag was trained with QuickGELU (OpenAI); open_clip only warns
            model_cfg["quick_gelu"] = True
        mean, std = tag_cfg.get("mean", OPENAI_CLIP_MEAN), tag_cfg.get("std", OPENAI_CLIP_STD)
        source = f"open_clip:{arch}/{pretrained}"
    elif Path(pretrained).expanduser().is_file():
        weights, mean, std = str(Path(pretrained).expanduser()), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        source = f"open_clip:{arch}/{pretrained}"
    else:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise ValueError(f"open_clip:{arch}: pretrained={pretrained!r} is neither a known tag ({', '.join(tags)}) "
                         "nor a weights file")
    return encoder_from_weights(model_cfg, read_weights(weights), source, mean=mean, std=std)
