"""`medvqa pretrain-eval`: retrieval (image<->text R@1/5/10) and zero-shot scores of a CLIP model on a caption split."""
from __future__ import annotations

import json

from .options import add_device_arguments, apply_runtime, command_parser

EXAMPLE = """examples:
  medvqa pretrain-eval --model runs/pretrain/clip --data runs/phantom/captions --split validate
  medvqa pretrain-eval --model runs/medpix/clip --data path/to/medpix2 --split dev --exclude-vqa-rad
  medvqa pretrain-eval ... --shuffle-captions       # control: pairs broken at random -> chance level

The split is read as `medvqa pretrain` reads it (same flags), so the numbers match its metrics.json.
Zero-shot scores only label fields whose classes the prompt file names (--prompts)."""


def build_parser():
    from pretrain.data import CAPTION_FORMATS

    p = command_parser("medvqa pretrain-eval", __doc__.split(": ", 1)[1], EXAMPLE)
    p.add_argument("--model", required=True, help="OUT/clip of `medvqa pretrain`, a CLIP folder or hub id")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="runs/phantom/captions")
    g.add_argument("--caption-format", default="auto", choices=CAPTION_FORMATS)
    g.add_argument("--split", default="validate")
    g.add_argument("--image-column", default="image")
    g.add_argument("--caption-column", default="caption")
    g.add_argument("--exclude-vqa-rad", action="store_true", help="drop pairs marked also_in_vqa_rad (MedPix 2.0)")
    g.add_argument("--prompts", default=None, help="zero-shot prompt JSON (default: the phantom's)")
    g.add_argument("--shuffle-captions", action="store_true", help="control: pair captions with random images")
    g.add_argument("--seed", type=int, default=0, help="of the caption shuffle")
    g = p.add_argument_group("runtime")
    add_device_arguments(g)
    p.add_argument("--out", default=None, help="also write the metrics JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from encoders import ImageTable
    from pretrain import load_captions, load_clip_model, shuffle_captions
    from pretrain.evaluate import evaluate, load_prompts

    from ..io import atomic_write_text

    device = apply_runtime(args)
    pairs = load_captions(args.data, args.split, args.caption_format, image_column=args.image_column,
                          caption_column=args.caption_column, exclude_vqa_rad=args.exclude_vqa_rad)
    if args.shuffle_captions:
        pairs = shuffle_captions(pairs, args.seed)
    model = load_clip_model(args.model).to(device)
    table = ImageTable([p.image for p in pairs], model.image_encoder.image_size, model.image_encoder.in_chans)
    metrics = evaluate(model, pairs, table, device, args.precision, load_prompts(args.prompts))
    metrics["protocol"] = {"split": args.split, "pairs": len(pairs), "exclude_vqa_rad": args.exclude_vqa_rad,
                           "shuffled_captions": args.shuffle_captions}
    text = json.dumps(metrics, indent=2)
    if args.out:
        atomic_write_text(args.out, text + "\n")
    print(text)
    return 0
