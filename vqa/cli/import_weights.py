"""`medvqa import FORMAT SRC OUT`: released weights as safetensors folders (MEVF, OpenAI CLIP, PMC-CLIP, encoders)."""
from __future__ import annotations

import argparse
import json

from .options import command_parser

EXAMPLE = """examples:
  medvqa import mevf path/to/mevf runs/mevf
  medvqa train --format vqa-rad --data path/to/vqa-rad --encoder runs/mevf/encoder \\
      --encoder-mode finetune --glove runs/mevf/glove_300d.txt --head mevf-ban --out runs/mevf-ban
  medvqa import openai-clip path/to/PubMedCLIP_ViT32.pth runs/pubmedclip-vit   # --encoder runs/pubmedclip-vit/encoder
  medvqa import pmc-clip path/to/checkpoint.pt runs/pmc-clip
  medvqa import encoder hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 runs/biomedclip

mevf: SRC holds MEVF's release: pretrained_maml.weights, pretrained_ae.pth, dictionary.pkl and
glove6b_init_300d.npy, read with a restricted unpickler (plain data and numpy arrays only); OUT gets
encoder/ (safetensors), glove_300d.txt and dictionary.json; with embed_tfidf_weights.pkl (MEVF's and QCR's
600-d word embedding, a torch 0.4 module pickle read without running it) also glove_tfidf_600d.txt, for
--glove OUT/glove_tfidf_600d.txt --embed-dim 600.
openai-clip, pmc-clip, encoder: OUT/encoder is the image tower as config.json + model.safetensors, giving
the same features as the source; pickles are read with torch.load(weights_only=True) or refused."""

ENCODER_HELP = {"openai-clip": "an OpenAI-format CLIP file (PubMedCLIP's RN50 / RN50x4 / ViT-B/32, OpenAI's .pt)",
                "pmc-clip": "PMC-CLIP's checkpoint.pt or its image_encoder(resnet50).pth",
                "encoder": "anything --encoder accepts (hf-hub:, local-dir:, open_clip:, a name, a file)"}


def build_parser():
    p = command_parser("medvqa import", "convert released weights to safetensors folders", EXAMPLE)
    sub = p.add_subparsers(dest="source", required=True)
    m = sub.add_parser("mevf", help="MEVF's released VQA-RAD weights", epilog=EXAMPLE,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("src", help="folder with pretrained_maml.weights, pretrained_ae.pth, dictionary.pkl, "
                               "glove6b_init_300d.npy")
    m.add_argument("out", help="output folder")
    m.add_argument("--overwrite", action="store_true")
    m.set_defaults(run=_import_mevf)
    for name, help_text in ENCODER_HELP.items():
        e = sub.add_parser(name, help=help_text, epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
        e.add_argument("src", help=help_text)
        e.add_argument("out", help="output folder (OUT/encoder is written)")
        e.add_argument("--overwrite", action="store_true")
        e.set_defaults(run=_import_encoder)
    return p


def _import_mevf(args) -> dict:
    """MEVF's release -> OUT/encoder, OUT/glove_300d.txt, OUT/dictionary.json; what was written."""
    from ..importers import import_mevf

    out = import_mevf(args.src, args.out, args.overwrite)
    written = {"out": str(out), "encoder": str(out / "encoder"), "glove": str(out / "glove_300d.txt")}
    if (out / "glove_tfidf_600d.txt").is_file():
        written["glove_tfidf"] = str(out / "glove_tfidf_600d.txt")
    return written


def _import_encoder(args) -> dict:
    """A released image tower (the subcommand names its format) -> OUT/encoder; what was written."""
    from ..importers import import_encoder

    out = import_encoder(args.source, args.src, args.out, args.overwrite)
    return {"out": str(out), "encoder": str(out / "encoder")}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(json.dumps(args.run(args)))
    return 0
