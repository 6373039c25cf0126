"""The configuration of CLIP pretraining (`medvqa pretrain`): one dataclass on the engine's fields."""
from __future__ import annotations

from dataclasses import dataclass, field

from vqa.errors import DataError
from vqa.training import EngineConfig
from vqa.training.schedule import check_schedule


@dataclass
class PretrainConfig(EngineConfig):
    # data
    data: str = "runs/phantom/captions"  # jsonl/csv file or folder, ROCO folder, `datasets` folder or hub id
    caption_format: str = "auto"  # auto | jsonl | csv | roco | hf
    train_split: str = "train"
    val_split: str = "validate"  # held out for retrieval/zero-shot; "none" to skip (dev/validation also found)
    image_column: str = "image"
    caption_column: str = "caption"
    exclude_vqa_rad: bool = False  # drop pairs marked also_in_vqa_rad (MedPix 2.0) before evaluating on VQA-RAD
    shuffle_captions: bool = False  # control: train on captions paired with random images
    train_data: str | None = None  # WebDataset shards streamed for training instead of --data's train split:
    #                                a folder, 'dir/{000000..000009}.tar', a glob, or '::'-joined patterns;
    #                                or Parquet files (image_column, caption_column), row groups as shards
    train_num_samples: int | None = None  # samples per epoch with --train-data (None: one pass over the shards)
    shard_mix: int = 8  # shards whose samples are shuffled together (a batch mixes them; each worker indexes them)
    vocab_captions: int = 200_000  # with --train-data: captions read for a built text tower's word vocabulary
    prompts: str | None = None  # zero-shot prompt JSON; None: the phantom's (fields whose classes it names)
    # model
    encoder: str = "clip-vit-tiny"  # image tower: registered name, timm:<name>, folder or hub id
    encoder_args: dict = field(default_factory=dict)  # overrides of a registered encoder, e.g. image_size
    text: str = "bert-tiny"  # bert-tiny | clip-text-tiny | clip-text-b | minilm | folder | hub id
    text_args: dict = field(default_factory=dict)  # overrides of a built text tower, e.g. hidden_size
    text_pooling: str | None = None  # None: eos for CLIP text models, else mean
    clip_model: str | None = None  # start both towers from a Hugging Face CLIP checkpoint (PubMedCLIP's recipe)
    embed_dim: int | None = None  # shared embedding; None: the CLIP encoder's projection_dim, else 256
    freeze_text: bool | None = None  # None: frozen for a pretrained --text model (LiT); built towers and
    #                                  --clip-model train
    mlm_weight: float = 0.0  # PMC-CLIP: loss = contrastive + mlm_weight * masked-LM
    mlm_probability: float = 0.15
    init_temperature: float = 0.07
    # images
    image_cache: str = "auto"  # ram (decode once) | stream (decode per batch) | auto
    cache_limit_gb: float = 8.0
    workers: int = 0  # DataLoader processes for decoding
    augment: bool = False  # small random affine, no flips
    # optimisation beyond the engine's
    accum_steps: int = 1  # micro-batches per optimizer step (negatives span all of them)
    text_lr: float | None = None  # None: lr (a pretrained, unfrozen text tower often wants less)
    # the engine's fields, with this task's defaults
    epochs: int = 20
    batch_size: int = 64  # per process
    lr: float = 1e-3
    weight_decay: float = 0.1
    clip_norm: float | None = 1.0
    out: str = "runs/pretrain"

    def validate(self) -> None:
        """Values no run could use are DataErrors naming the flag."""
        check_schedule(self.lr_schedule, self.warmup_epochs)
        for name in ("batch_size", "accum_steps"):
            if getattr(self, name) < 1:
                raise DataError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.epochs < 0:
            raise DataError(f"--epochs must be 0 (save the untrained towers) or more, got {self.epochs}")
        for name in ("train_num_samples", "shard_mix", "vocab_captions"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise DataError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if not 0 < self.mlm_probability < 1:
            raise DataError(f"--mlm-probability must be in (0, 1), got {self.mlm_probability}")
