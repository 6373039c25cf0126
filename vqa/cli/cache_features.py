"""`medvqa cache-features`: encode every image of a dataset once with a frozen encoder."""
from __future__ import annotations

import json

from .options import add_dataset_arguments, add_device_arguments, add_format_argument, apply_runtime, command_parser

EXAMPLE = """examples:
  medvqa cache-features --encoder clip-vit-b32 --format vqa-rad --data runs/phantom/vqa-rad
  medvqa cache-features --encoder runs/pretrain/encoder --format slake --data path/to/Slake1.0 \\
      --splits train validate test --device cuda

Training (`medvqa train`) fills the same cache automatically; running this first
just moves the encoding out of the training run. The cache is keyed by the
encoder's fingerprint (config + weights) and each image's content hash."""


def build_parser():
    p = command_parser("medvqa cache-features", __doc__.split(": ", 1)[1], EXAMPLE)
    p.add_argument("--encoder", required=True, help="encoder name, save_pretrained folder or hub id")
    g = p.add_argument_group("data")
    add_format_argument(g)
    add_dataset_arguments(g)
    g.add_argument("--splits", nargs="+", default=["train", "test"])
    p.add_argument("--cache-dir", default=None, help="cache root (default: $MEDVQA_CACHE/features)")
    p.add_argument("--batch-size", type=int, default=32)
    add_device_arguments(p.add_argument_group("runtime"), precision=False)
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from encoders import create_encoder

    from ..batches import unique_images
    from ..data import load_records
    from ..features import cache_folder, feature_table

    device = apply_runtime(args)
    encoder = create_encoder(args.encoder).to(device).freeze()
    records = [r for split in args.splits for r in load_records(args.format, args.data, split, lang=args.lang)]
    images, _ = unique_images([r.image for r in records])
    table = feature_table(encoder, images, args.cache_dir, batch_size=args.batch_size, device=device,
                          progress=not args.no_progress)
    print(json.dumps({"cache": str(cache_folder(encoder, args.cache_dir)), "images": len(images),
                      "grid": list(table["grid"].shape[1:])}, indent=2))
    return 0
