"""`medvqa cache-features`: encode every image of a dataset once with a frozen encoder."""
from __future__ import annotations

import argparse
import json

from ..batches import unique_images
from ..data import load_records
from ..features import cache_folder, feature_table
from ..precision import resolve_device

EXAMPLE = """examples:
  medvqa cache-features --encoder clip-vit-b32 --dataset vqa-rad --data runs/phantom/vqa-rad
  medvqa cache-features --encoder runs/pretrain/encoder --dataset slake --data path/to/Slake1.0 \\
      --splits train validate test --device cuda

Training (`medvqa train`) fills the same cache automatically; running this first
just moves the encoding out of the training run. The cache is keyed by the
encoder's fingerprint (config + weights) and each image's content hash."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medvqa cache-features", description=__doc__.split(": ", 1)[1],
                                epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", required=True, help="encoder name, save_pretrained folder or hub id")
    p.add_argument("--dataset", required=True, choices=["vqa-rad", "slake", "pmc-vqa", "hf"])
    p.add_argument("--data", required=True)
    p.add_argument("--splits", nargs="+", default=["train", "test"])
    p.add_argument("--lang", default="en")
    p.add_argument("--cache-dir", default=None, help="cache root (default: $MEDVQA_CACHE/features)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    return p


def main(argv: list[str] | None = None) -> int:
    from encoders import create_encoder

    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    encoder = create_encoder(args.encoder).to(device).freeze()
    kwargs = {"lang": args.lang} if args.dataset in ("slake", "hf") else {}
    records = [r for split in args.splits for r in load_records(args.dataset, args.data, split, **kwargs)]
    images, _ = unique_images(records)
    table = feature_table(encoder, images, args.cache_dir, batch_size=args.batch_size, device=device)
    print(json.dumps({"cache": str(cache_folder(encoder, args.cache_dir)), "images": len(images),
                      "grid": list(table["grid"].shape[1:])}, indent=2))
    return 0
