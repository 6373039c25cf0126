"""`medvqa probe`: linear probes of an encoder's frozen features on the phantom's ground truth (what a head can read)."""
from __future__ import annotations

from pathlib import Path

from .options import apply_runtime, command_parser, parse_key_values

EXAMPLE = """examples:
  medvqa probe --encoder runs/pretrain/encoder --phantom runs/phantom
  medvqa probe --encoder runs/pretrain/encoder --encoder vit-tiny --encoder-arg image_size=128 \\
      --phantom runs/phantom --json runs/probe.json     # pretrained against an untrained tower

For each field of the phantom's scene (modality, plane, region, abnormal, count, lesion
kind/size/side/organ), a ridge classifier on standardised features is fitted on the
train+validate images and scored on the test images, on the pooled vector and on the
flattened grid."""


def build_parser():
    p = command_parser("medvqa probe", __doc__.split(": ", 1)[1], EXAMPLE)
    p.add_argument("--encoder", action="append", required=True, help="encoder name or folder (repeatable)")
    p.add_argument("--encoder-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="overrides for registered names (applied to each)")
    p.add_argument("--phantom", default="runs/phantom", help="a `medvqa phantom` folder")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed of registered (untrained) encoders")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: one per core)")
    p.add_argument("--json", default=None, help="also write the results here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from encoders import create_encoder
    from pretrain.probe import linear_probe, table

    from ..io import atomic_write_json

    apply_runtime(args)
    results = {}
    for name in args.encoder:
        torch.manual_seed(args.seed)
        kwargs = {} if Path(name).is_dir() else parse_key_values(args.encoder_arg, "--encoder-arg")
        results[name] = linear_probe(create_encoder(name, **kwargs), args.phantom)
    print(table(results))
    if args.json:
        atomic_write_json(args.json, results)
    return 0
