"""Image encoders behind one interface, text towers, and the frozen-feature cache.

    from encoders import create_encoder, list_encoders, FeatureCache
    enc = create_encoder("clip-vit-tiny")           # or "clip-vit-b32", "resnet50", "mevf", a folder, a hub id
    out = enc(enc.preprocess(images))               # {"grid": (B, N, D), "pooled": (B, D)}

Names are imported on first use (PEP 562), so `import encoders` (and its small helpers such
as `encoders._files`) costs nothing until a model is needed; the registry imports the
built-in encoders (CLIP towers, timm backbones, EfficientNet-Lite, MEVF) before its first lookup.
Released weights load in their own formats (open_clip `hf-hub:`/`local-dir:`/`open_clip:`, OpenAI-format
CLIP files, PMC-CLIP checkpoints, timm weight files; see `encoders._registry`), pickles never unpickled
beyond tensors and plain data (`encoders._weights`).
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "create_encoder": "_registry", "list_encoders": "_registry", "load_encoder_folder": "_registry",
    "register_encoder": "_registry", "register_family": "_registry", "encoder_from_config": "_registry",
    "save_reference": "_registry", "REFERENCE_FORMAT": "_registry",
    "ImageEncoder": "base", "Freezable": "base",
    "FeatureCache": "cache", "image_hash": "cache", "bytes_hash": "cache",
    "CLIPEncoderConfig": "clip", "CLIPVisionEncoder": "clip",
    "load_image": "images", "decode_image": "images",
    "ImageTable": "pixels", "StreamingImages": "pixels", "image_source": "pixels", "normalize": "pixels",
    "AutoencoderReconstructionLoss": "mevf", "MEVFConfig": "mevf", "MEVFEncoder": "mevf",
    "UnsafePickleError": "mevf_weights", "convert_mevf_weights": "mevf_weights", "safe_unpickle": "mevf_weights",
    "TextTower": "text", "TextQuestionEncoder": "text", "create_text_tower": "text", "list_text_towers": "text",
    "build_word_tokenizer": "text", "minilm_folder": "text",
    "TimmEncoder": "timm_backbone", "TimmEncoderConfig": "timm_backbone",
    "OpenCLIPEncoder": "open_clip_tower", "OpenCLIPEncoderConfig": "open_clip_tower", "OpenCLIPText": "open_clip_tower",
    "encoder_from_file": "released", "openai_model_cfg": "released", "detect_format": "released",
    "read_weights": "_weights", "PREFIXES": "_registry", "describe_encoder": "_registry",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'encoders' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
