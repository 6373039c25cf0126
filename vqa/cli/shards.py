"""`medvqa shards`: write image-caption pairs as WebDataset tar shards (+ manifest.json) for streaming
pretraining (`medvqa pretrain --train-data OUT`)."""
from __future__ import annotations

import json
import time

from .options import command_parser

EXAMPLE = """examples:
  medvqa shards --data runs/phantom/captions --out runs/shards                # phantom captions, train split
  medvqa shards --data path/to/pmc-oa --split train --shard-size 5000 --workers 8 --out /data/pmc-oa-shards
  medvqa shards --caption-format roco --data path/to/roco --out /data/roco-shards
  medvqa shards --data pairs.csv --image-column path --caption-column text --out /data/csv-shards
  medvqa pretrain --train-data '/data/pmc-oa-shards/{000000..000327}.tar' --train-num-samples 1600000 ...

OUT gets 000000.tar, 000001.tar, ... (per sample <key>.jpg or .png, <key>.txt, <key>.json) and
manifest.json (per shard: samples, bytes, sha256; totals; the source; the images that could not
be read, with the reason). Each shard is written under a temp name, then renamed."""


def build_parser():
    from pretrain.data import CAPTION_FORMATS

    p = command_parser("medvqa shards", __doc__.split(": ", 1)[1], EXAMPLE)
    g = p.add_argument_group("source (what `medvqa pretrain --data` reads)")
    g.add_argument("--data", default="runs/phantom/captions",
                   help="captions: jsonl/csv file or folder, ROCO folder, `datasets` folder or hub id "
                        "(default: %(default)s)")
    g.add_argument("--caption-format", default="auto", choices=CAPTION_FORMATS)
    g.add_argument("--split", default="train", help="which split to write (default: %(default)s)")
    g.add_argument("--image-column", default="image")
    g.add_argument("--caption-column", default="caption")
    g.add_argument("--exclude-vqa-rad", action="store_true",
                   help="drop pairs marked also_in_vqa_rad (MedPix 2.0); pairs without the mark are refused")
    g = p.add_argument_group("shards")
    g.add_argument("--out", required=True, help="output folder of the shards and manifest.json")
    g.add_argument("--shard-size", type=int, default=1000, help="pairs per shard (default: %(default)s)")
    g.add_argument("--workers", type=int, default=0, help="writer processes, one shard each at a time "
                                                          "(default: %(default)s = this process)")
    g.add_argument("--overwrite", action="store_true", help="replace the shards already in OUT")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    from pretrain.data import load_captions
    from pretrain.shards import write_shards

    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    pairs = load_captions(args.data, args.split, args.caption_format, image_column=args.image_column,
                          caption_column=args.caption_column, exclude_vqa_rad=args.exclude_vqa_rad)
    source = {"data": args.data, "caption_format": args.caption_format, "split": args.split,
              "image_column": args.image_column, "caption_column": args.caption_column,
              "exclude_vqa_rad": args.exclude_vqa_rad, "pairs": len(pairs)}
    manifest = write_shards(pairs, args.out, args.shard_size, args.workers, source=source,
                            overwrite=args.overwrite, progress=not args.no_progress)
    print(json.dumps({"out": args.out, **manifest["total"], "seconds": round(time.perf_counter() - start, 1)},
                     indent=2))
    return 0
