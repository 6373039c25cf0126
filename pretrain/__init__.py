"""CLIP pretraining of image encoders on medical image-caption pairs (an app on `encoders`).

    from pretrain import PretrainConfig, pretrain, load_clip_model
    metrics = pretrain(PretrainConfig(data="runs/phantom/captions", encoder="vit-tiny", epochs=5, out="runs/p"))
    model = load_clip_model("runs/p/clip")                 # CLIPPretrainModel (image + text towers)
    encoder = encoders.create_encoder("runs/p/encoder")    # the image tower alone, for `medvqa train`

Modules: config (PretrainConfig and the command line), data (caption pairs: jsonl, csv, ROCO,
datasets), images (decode-once uint8 tables), text (text towers, word-level tokenizer, MLM
masking), model (CLIPPretrainModel, save/load), loss (ClipLoss, MaskedLMLoss), step (batch
plan, accumulation), train (`medvqa pretrain`), evaluate (retrieval, zero-shot), probe
(linear probes of frozen features on the phantom's ground truth).
"""
from .data import CaptionPair, load_captions, shuffle_captions
from .evaluate import evaluate, retrieval_metrics, zero_shot
from .loss import ClipLoss, MaskedLMLoss
from .model import CLIPPretrainModel, ContrastiveConfig, load_clip_model
from .text import TextTower, build_word_tokenizer, create_text_tower, list_text_towers
from .train import PretrainConfig, pretrain

__all__ = [
    "CLIPPretrainModel", "CaptionPair", "ClipLoss", "ContrastiveConfig", "MaskedLMLoss", "PretrainConfig",
    "TextTower", "build_word_tokenizer", "create_text_tower", "evaluate", "list_text_towers", "load_captions",
    "load_clip_model", "pretrain", "retrieval_metrics", "shuffle_captions", "zero_shot",
]
