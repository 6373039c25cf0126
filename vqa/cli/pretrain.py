"""`medvqa pretrain`: contrastive image-text pretraining (CLIP, + optional masked-LM) of an image encoder;
OUT/encoder is the trained image tower for `medvqa train --encoder OUT/encoder`."""
from __future__ import annotations

import argparse
import json

from .options import add_engine_arguments, command_parser, config_from_command_line

EXAMPLE = """examples:
  medvqa pretrain                                          # phantom captions, clip-vit-tiny + bert-tiny
  medvqa pretrain --data runs/phantom/captions --encoder vit-tiny --encoder-arg image_size=128 \\
      --epochs 30 --augment --out runs/pretrain-vit
  medvqa pretrain --data path/to/medpix2 --val-split dev --exclude-vqa-rad --text minilm \\
      --encoder clip-vit-b32 --precision bf16 --out runs/medpix    # LiT-style: MiniLM frozen
  medvqa pretrain --caption-format roco --data path/to/roco --clip-model openai/clip-vit-base-patch32 \\
      --lr 1e-5 --batch-size 64 --epochs 50                       # PubMedCLIP's recipe (online)
  medvqa pretrain --text bert-tiny --mlm-weight 1.0 ...           # PMC-CLIP: + masked-LM loss
  medvqa pretrain ... --epochs 0 --out runs/untrained             # the untrained towers: a control
  torchrun --nproc_per_node 4 -m vqa.cli pretrain --precision bf16 ...   # DDP; --batch-size is per GPU
  medvqa shards --data path/to/pmc-oa --out shards && medvqa pretrain --train-data 'shards/{000000..000099}.tar' \\
      --train-num-samples 100000 --workers 4 --checkpoint-every 500 ...  # streamed; resumable mid-epoch
  medvqa pretrain ... --resume latest                               # continue OUT/checkpoint.pt

OUT gets run_config.json, history.json/.csv, checkpoint.pt (each epoch), metrics.json
(retrieval and zero-shot before/after on the held-out split), encoder/ (the image tower:
`medvqa train --encoder OUT/encoder`) and clip/ (the whole model; a transformers CLIPModel
folder when both towers are CLIP ones)."""


def build_parser():
    from pretrain import PretrainConfig
    from pretrain.data import CAPTION_FORMATS

    d = PretrainConfig()
    p = command_parser("medvqa pretrain", __doc__.split(": ", 1)[1], EXAMPLE)
    g = p.add_argument_group("data")
    g.add_argument("--data", default=d.data, help="captions: jsonl/csv file or folder, ROCO folder, `datasets` "
                                                  "folder or hub id (default: %(default)s)")
    g.add_argument("--caption-format", default=d.caption_format, choices=CAPTION_FORMATS)
    g.add_argument("--train-split", default=d.train_split)
    g.add_argument("--val-split", default=d.val_split, help="held-out split for retrieval (validate/dev/"
                                                            "validation are aliases); 'none' to skip")
    g.add_argument("--image-column", default=d.image_column)
    g.add_argument("--caption-column", default=d.caption_column)
    g.add_argument("--exclude-vqa-rad", action=argparse.BooleanOptionalAction, default=False,
                   help="drop pairs marked also_in_vqa_rad (MedPix 2.0); pairs without the mark are refused")
    g.add_argument("--shuffle-captions", action=argparse.BooleanOptionalAction, default=False,
                   help="control: captions paired with random images")
    g.add_argument("--train-data", default=None, metavar="SHARDS",
                   help="stream WebDataset tar shards for training (`medvqa shards`, img2dataset): a folder, "
                        "'dir/{000000..000009}.tar' or a glob; or Parquet files (a `datasets` folder; "
                        "--image-column/--caption-column); --data then gives only the held-out split")
    g.add_argument("--train-num-samples", type=int, default=None,
                   help="samples per epoch with --train-data (default: one pass over the shards)")
    g.add_argument("--shard-mix", type=int, default=d.shard_mix,
                   help="shards whose samples are shuffled together into batches (default: %(default)s)")
    g.add_argument("--vocab-captions", type=int, default=d.vocab_captions,
                   help="with --train-data: captions read for a built text tower's vocabulary (default: %(default)s)")
    g.add_argument("--prompts", default=None, help="zero-shot prompt JSON (default: the phantom's; fields whose "
                                                   "classes it does not name are skipped)")
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
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=False,
                   help="small random affine per image (no flips)")
    groups = add_engine_arguments(p, d)
    groups["outputs"].add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, metavar="STEPS",
                                   help="also checkpoint every STEPS optimizer steps within an epoch; --resume "
                                        "continues after the last one saved (default: at epoch ends only)")
    g = groups["optimisation"]
    g.add_argument("--accum-steps", type=int, default=d.accum_steps,
                   help="micro-batches per optimizer step; the negatives span all of them")
    g.add_argument("--text-lr", type=float, default=None, help="learning rate of a trained text tower (default: --lr)")
    return p


def main(argv: list[str] | None = None) -> int:
    from pretrain import PretrainConfig, pretrain

    cfg = config_from_command_line(PretrainConfig, build_parser(), argv)
    metrics = pretrain(cfg)
    if metrics.get("after"):
        print(json.dumps({"out": cfg.out, "before": metrics["before"]["retrieval"],
                          "after": metrics["after"]["retrieval"],
                          "zero_shot": {k: v["accuracy"] for k, v in metrics["after"]["zero_shot"].items()}},
                         indent=2))
    return 0
