"""`medvqa phantom OUT`: write the phantom dataset."""
from __future__ import annotations

import json
import time

from .options import command_parser

EXAMPLE = """example:
  medvqa phantom runs/phantom --images 2000 --seed 0

OUT then holds vqa-rad/ (official JSON + trainset/testset.json + images/),
slake/ (train/validate/test.json + imgs/), pmc-vqa/ (train/test.csv + images/),
pathvqa/ (qas/{train,val,test}_vqa.pkl + images/{split}/), classification/ (imagefolder/TASK/SPLIT/CLASS/
and MedMNIST-style medmnist/FLAG_64.npz of modality, organ, abnormal and multi-label findings),
captions/ (train/validate/test.jsonl for pretraining) and phantom.jsonl (ground truth)."""


def build_parser():
    p = command_parser("medvqa phantom", __doc__.split(":", 1)[1].strip(), EXAMPLE)
    p.add_argument("out", help="output folder (written atomically)")
    p.add_argument("--images", type=int, default=2000, help="number of images (default: 2000)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same dataset (default: 0)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default: 256)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: one per core)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    return p


def main(argv: list[str] | None = None) -> int:
    from ..phantom import generate_phantom

    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    summary = generate_phantom(args.out, args.images, seed=args.seed, size=args.size, workers=args.workers,
                               overwrite=args.overwrite, progress=True)
    print(json.dumps({"out": args.out, **summary, "seconds": round(time.perf_counter() - start, 1)}, indent=2))
    return 0
