"""The configuration of `medvqa pretrain`: one dataclass, and the command line that fills it."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from vqa.errors import DataError
from vqa.runtime import parse_key_values

DESCRIPTION = ("contrastive image-text pretraining (CLIP, + optional masked-LM) of an image encoder; "
               "OUT/encoder is the trained image tower for `medvqa train --encoder OUT/encoder`")


@dataclass
class PretrainConfig:
    # data
    data: str = "runs/phantom/captions"  # jsonl/csv file or folder, ROCO folder, `datasets` folder or hub id
    format: str = "auto"  # auto | jsonl | csv | roco | hf
    train_split: str = "train"
    val_split: str = "validate"  # held out for retrieval/zero-shot; "none" to skip (dev/validation also found)
    image_column: str = "image"
    caption_column: str = "caption"
    exclude_vqa_rad: bool = False  # drop pairs marked also_in_vqa_rad (MedPix 2.0) before evaluating on VQA-RAD
    shuffle_captions: bool = False  # control: train on captions paired with random images
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
    # optimisation
    epochs: int = 20
    batch_size: int = 64  # per process
    accum_steps: int = 1  # micro-batches per optimizer step (negatives span all of them)
    lr: float = 1e-3
    text_lr: float | None = None  # None: lr (a pretrained, unfrozen text tower often wants less)
    weight_decay: float = 0.1
    warmup_epochs: float = 1.0
    clip_norm: float = 1.0
    precision: str = "fp32"
    device: str = "auto"
    threads: int | None = None  # CPU threads for torch (default: torch's choice, one per core)
    compile: bool = False
    seed: int = 0
    # outputs
    out: str = "runs/pretrain"
    resume: str | None = None
    stop_after: int | None = None  # end this run after N epochs (resume later with --resume latest)
    progress: bool = True


EXAMPLE = """examples:
  medvqa pretrain                                          # phantom captions, clip-vit-tiny + bert-tiny
  medvqa pretrain --data runs/phantom/captions --encoder vit-tiny --encoder-arg image_size=128 \\
      --epochs 30 --augment --out runs/pretrain-vit
  medvqa pretrain --data ../shared/data/medpix2 --val-split dev --exclude-vqa-rad --text minilm \\
      --encoder clip-vit-b32 --precision bf16 --out runs/medpix    # LiT-style: MiniLM frozen
  medvqa pretrain --format roco --data path/to/roco --clip-model openai/clip-vit-base-patch32 \\
      --lr 1e-5 --batch-size 64 --epochs 50                       # PubMedCLIP's recipe (online)
  medvqa pretrain --text bert-tiny --mlm-weight 1.0 ...           # PMC-CLIP: + masked-LM loss
  torchrun --nproc_per_node 4 -m vqa.cli pretrain --precision bf16 ...   # DDP; --batch-size is per GPU
  medvqa pretrain ... --resume latest                               # continue OUT/checkpoint.pt

OUT gets run_config.json, history.json/.csv, checkpoint.pt (each epoch), metrics.json
(retrieval and zero-shot before/after on the held-out split), encoder/ (the image tower:
`medvqa train --encoder OUT/encoder`) and clip/ (the whole model; a transformers CLIPModel
folder when both towers are CLIP ones)."""


def build_parser() -> argparse.ArgumentParser:
    d = PretrainConfig()
    p = argparse.ArgumentParser(prog="medvqa pretrain", description=DESCRIPTION, epilog=EXAMPLE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default=d.data, help="captions: jsonl/csv file or folder, ROCO folder, `datasets` "
                                                  "folder or hub id (default: %(default)s)")
    g.add_argument("--format", default=d.format, choices=["auto", "jsonl", "csv", "roco", "hf"])
    g.add_argument("--train-split", default=d.train_split)
    g.add_argument("--val-split", default=d.val_split, help="held-out split for retrieval (validate/dev/"
                                                            "validation are aliases); 'none' to skip")
    g.add_argument("--image-column", default=d.image_column)
    g.add_argument("--caption-column", default=d.caption_column)
    g.add_argument("--exclude-vqa-rad", action="store_true", help="drop pairs marked also_in_vqa_rad (MedPix 2.0)")
    g.add_argument("--shuffle-captions", action="store_true", help="control: captions paired with random images")
    g = p.add_argument_group("model")
    g.add_argument("--encoder", default=d.encoder, help="image tower: registered name, timm:<name>, folder or "
                                                        "hub id (default: %(default)s)")
    g.add_argument("--encoder-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="override of a registered encoder's config, e.g. image_size=128 (repeatable)")
    g.add_argument("--text", default=d.text, help="text tower: bert-tiny | clip-text-tiny | clip-text-b | minilm | "
                                                  "folder | hub id (default: %(default)s)")
    g.add_argument("--text-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="override of a built text tower, e.g. hidden_size=256 (repeatable)")
    g.add_argument("--text-pooling", default=None, choices=["eos", "mean", "cls"])
    g.add_argument("--clip-model", default=None, help="start both towers from a Hugging Face CLIP folder or hub id")
    g.add_argument("--embed-dim", type=int, default=None, help="shared embedding size (default: the CLIP "
                                                                "encoder's projection_dim, else 256)")
    frz = g.add_mutually_exclusive_group()
    frz.add_argument("--freeze-text", dest="freeze_text", action="store_const", const=True, default=None,
                     help="lock the text tower (default for a pretrained --text: minilm, a folder, a hub id)")
    frz.add_argument("--train-text", dest="freeze_text", action="store_const", const=False,
                     help="train the text tower (default for built towers and --clip-model)")
    g.add_argument("--mlm-weight", type=float, default=d.mlm_weight, help="masked-LM loss weight (PMC-CLIP); 0 = off")
    g.add_argument("--mlm-probability", type=float, default=d.mlm_probability)
    g.add_argument("--init-temperature", type=float, default=d.init_temperature)
    g = p.add_argument_group("images")
    g.add_argument("--image-cache", default=d.image_cache, choices=["auto", "ram", "stream"],
                   help="ram: decode each image once into a uint8 table; stream: decode per batch")
    g.add_argument("--cache-limit-gb", type=float, default=d.cache_limit_gb)
    g.add_argument("--workers", type=int, default=d.workers, help="decoding processes (default: %(default)s)")
    g.add_argument("--augment", action="store_true", help="small random affine per image (no flips)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="per process (default: %(default)s)")
    g.add_argument("--accum-steps", type=int, default=d.accum_steps)
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--text-lr", type=float, default=None)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    g.add_argument("--clip-norm", type=float, default=d.clip_norm, help="0 = no clipping")
    g.add_argument("--precision", default=d.precision, help="fp32 | bf16 | fp16 (fp16: CUDA only)")
    g.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: one per core; 1 is "
                                                              "several times faster when another job shares the cores)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--seed", type=int, default=d.seed)
    g = p.add_argument_group("outputs")
    g.add_argument("--out", default=d.out)
    g.add_argument("--resume", default=None, help="'latest' (OUT/checkpoint.pt) or a checkpoint path")
    g.add_argument("--stop-after", type=int, default=None, help="end this run after N epochs (resume later)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def config_from_args(args) -> PretrainConfig:
    values = {k: v for k, v in vars(args).items() if k in PretrainConfig.__dataclass_fields__}
    values["encoder_args"] = parse_key_values(args.encoder_arg, "--encoder-arg")
    values["text_args"] = parse_key_values(args.text_arg, "--text-arg")
    values["progress"] = not args.no_progress
    return PretrainConfig(**values)


def validate(cfg: PretrainConfig) -> None:
    for name in ("epochs", "batch_size", "accum_steps"):
        if getattr(cfg, name) < 1:
            raise DataError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if not 0 < cfg.mlm_probability < 1:
        raise DataError(f"--mlm-probability must be in (0, 1), got {cfg.mlm_probability}")
