"""Image encoders behind one interface, and the frozen-feature cache.

    from encoders import create_encoder, list_encoders, FeatureCache
    enc = create_encoder("clip-vit-tiny")           # or "clip-vit-b32", "resnet50", "mevf", a folder, a hub id
    out = enc(enc.preprocess(images))               # {"grid": (B, N, D), "pooled": (B, D)}

Importing this package registers the built-in encoders (CLIP towers, timm backbones, MEVF).
"""
from ._registry import create_encoder, list_encoders, load_encoder_folder, register_encoder, register_family
from .base import ImageEncoder
from .cache import FeatureCache, image_hash
from .clip import CLIPEncoderConfig, CLIPVisionEncoder
from .images import load_image
from .mevf import AutoencoderReconstructionLoss, MEVFConfig, MEVFEncoder
from .mevf_weights import UnsafePickleError, convert_mevf_weights, safe_unpickle
from .timm_backbone import TimmEncoder, TimmEncoderConfig

__all__ = [
    "AutoencoderReconstructionLoss", "CLIPEncoderConfig", "CLIPVisionEncoder", "FeatureCache", "ImageEncoder",
    "MEVFConfig", "MEVFEncoder", "TimmEncoder", "TimmEncoderConfig", "UnsafePickleError", "convert_mevf_weights",
    "create_encoder", "image_hash", "list_encoders", "load_encoder_folder", "load_image", "register_encoder",
    "register_family", "safe_unpickle",
]
