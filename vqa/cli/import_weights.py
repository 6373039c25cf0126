"""`medvqa import mevf SRC OUT`: MEVF's released files as a safetensors encoder and a GloVe table."""
from __future__ import annotations

import argparse
import json

from .options import command_parser

EXAMPLE = """example:
  medvqa import mevf path/to/mevf runs/mevf
  medvqa train --format vqa-rad --data path/to/vqa-rad --encoder runs/mevf/encoder \\
      --encoder-mode finetune --glove runs/mevf/glove_300d.txt --head mevf-ban --out runs/mevf-ban

SRC holds MEVF's release: pretrained_maml.weights, pretrained_ae.pth, dictionary.pkl and
glove6b_init_300d.npy. The pickles are read with a restricted unpickler (plain data and numpy
arrays only); OUT gets encoder/ (safetensors), glove_300d.txt and dictionary.json."""


def build_parser():
    p = command_parser("medvqa import", "convert released reference weights to safetensors", EXAMPLE)
    sub = p.add_subparsers(dest="source", required=True)
    m = sub.add_parser("mevf", help="MEVF's released VQA-RAD weights", epilog=EXAMPLE,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("src", help="folder with pretrained_maml.weights, pretrained_ae.pth, dictionary.pkl, "
                               "glove6b_init_300d.npy")
    m.add_argument("out", help="output folder")
    m.add_argument("--overwrite", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    from ..importers import import_mevf

    args = build_parser().parse_args(argv)
    out = import_mevf(args.src, args.out, args.overwrite)
    print(json.dumps({"out": str(out), "encoder": str(out / "encoder"), "glove": str(out / "glove_300d.txt")}))
    return 0
