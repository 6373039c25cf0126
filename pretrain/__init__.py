"""CLIP pretraining of image encoders on medical image-caption pairs: a task on the engine (`vqa.training`).

    from pretrain import PretrainConfig, pretrain, load_clip_model
    metrics = pretrain(PretrainConfig(data="runs/phantom/captions", encoder="vit-tiny", epochs=5, out="runs/p"))
    model = load_clip_model("runs/p/clip")                 # CLIPPretrainModel (image + text towers)
    encoder = encoders.create_encoder("runs/p/encoder")    # the image tower alone, for `medvqa train`

Modules: config (PretrainConfig), data (caption pairs: jsonl, csv, ROCO, datasets), shards (`medvqa shards`:
WebDataset tar shards + manifest), stream and parquet (`--train-data`: shards or Parquet streamed in a seeded
order split across ranks and workers, resumable mid-epoch), model (CLIPPretrainModel, save/load), loss (ClipLoss,
MaskedLMLoss), task (ContrastiveTask: batches, accumulation, MLM), train (`pretrain()`),
evaluate (retrieval, zero-shot), probe (linear probes of frozen features on the phantom's
ground truth), classify and classify_finetune (`medvqa classify`: MedMNIST-style image classification by
linear probe, fine-tuning or CLIP zero-shot), zero_shot_clip (any CLIP source as a zero-shot scorer),
zero_shot_choice (multiple choice by image-text similarity, `medvqa eval --zero-shot-clip`).
Text towers live in `encoders.text`, pixel tables in `encoders.pixels`.
"""
from .config import PretrainConfig
from .data import CaptionPair, load_captions, shuffle_captions
from .evaluate import evaluate, retrieval_metrics, zero_shot
from .loss import ClipLoss, MaskedLMLoss
from .model import CLIPPretrainModel, ContrastiveConfig, load_clip_model
from .task import ContrastiveTask
from .train import pretrain

__all__ = [
    "CLIPPretrainModel", "CaptionPair", "ClipLoss", "ContrastiveConfig", "ContrastiveTask", "MaskedLMLoss",
    "PretrainConfig", "evaluate", "load_captions", "load_clip_model", "pretrain", "retrieval_metrics",
    "shuffle_captions", "zero_shot",
]
