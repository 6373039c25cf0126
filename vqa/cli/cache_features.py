"""`medvqa cache-features`: encode every image of a dataset, or of tar shards, once with a frozen encoder."""
from __future__ import annotations

import json

from .options import add_dataset_arguments, add_device_arguments, add_format_argument, apply_runtime, command_parser

EXAMPLE = """examples:
  medvqa cache-features --encoder clip-vit-b32 --format vqa-rad --data runs/phantom/vqa-rad
  medvqa cache-features --encoder runs/pretrain/encoder --format slake --data path/to/Slake1.0 \\
      --splits train validate test --device cuda
  medvqa cache-features --encoder runs/pretrain/encoder --train-data 'runs/shards/{000000..000099}.tar'
  torchrun --nproc_per_node 4 -m vqa.cli cache-features --encoder runs/pretrain/encoder \\
      --train-data runs/shards --device cuda

Training (`medvqa train`) fills the same cache automatically; running this first
just moves the encoding out of the training run. The cache is keyed by the
encoder's fingerprint (config + weights) and each image's content hash: a shard
member that `medvqa shards` copied from a JPEG or PNG file has that file's hash,
so a later run over the files finds its features. Under torchrun each process
encodes its own block of the shards; rank 0 merges the parts into the cache."""


def build_parser():
    p = command_parser("medvqa cache-features", __doc__.split(": ", 1)[1], EXAMPLE)
    p.add_argument("--encoder", required=True, help="encoder name, save_pretrained folder or hub id")
    g = p.add_argument_group("data (a dataset, or --train-data shards)")
    add_format_argument(g, required=False)
    add_dataset_arguments(g, required=False)
    g.add_argument("--splits", nargs="+", default=["train", "test"])
    g.add_argument("--train-data", default=None,
                   help="WebDataset .tar shards instead of a dataset, as `medvqa pretrain --train-data` takes them: "
                        "a folder, a brace pattern {000000..000099}.tar, a glob, or ::-joined patterns")
    p.add_argument("--cache-dir", default=None, help="cache root (default: $MEDVQA_CACHE/features)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass, per process")
    add_device_arguments(p.add_argument_group("runtime"), precision=False)
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.train_data is not None:
        if args.format or args.data:
            parser.error("--train-data replaces --format/--data: give one or the other")
        return _shards(args)
    if not (args.format and args.data):
        parser.error("--format and --data are required (or --train-data for shards)")
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


def _shards(args) -> int:
    import os

    from pretrain.shard_features import ShardFeaturesConfig, cache_shard_features

    apply_runtime(args)  # --threads; the device is resolved per rank
    summary = cache_shard_features(ShardFeaturesConfig(
        train_data=args.train_data, encoder=args.encoder, cache_dir=args.cache_dir, batch_size=args.batch_size,
        device=args.device, progress=not args.no_progress))
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(summary, indent=2))
    return 0
