"""`medvqa encoders`: every encoder name and spelling `--encoder` accepts, with its input, grid, width and weights."""
from __future__ import annotations

import json

from .options import command_parser

EXAMPLE = """examples:
  medvqa encoders                      # the table: registered names, then the other spellings
  medvqa encoders --json               # the same as JSON lines
  medvqa encoders 'efficientnet-*'     # only names matching a pattern

  medvqa train --encoder efficientnet-lite0-imagenet ...                                  # ImageNet, offline
  medvqa train --encoder hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 ...  # online / cached
  medvqa train --encoder path/to/PubMedCLIP_ViT32.pth ...          # OpenAI-format CLIP file (PubMedCLIP)
  medvqa train --encoder path/to/pmc_clip/checkpoint.pt ...        # PMC-CLIP's training checkpoint

Registered names are built on the meta device to read their shapes (no weights are loaded or fetched).
grid is regions (rows x columns) of D-dimensional features; pooled is one D-vector per image."""


def build_parser():
    p = command_parser("medvqa encoders", __doc__.split(": ", 1)[1], EXAMPLE)
    p.add_argument("pattern", nargs="?", default="*", help="shell pattern over registered names (default: all)")
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    return p


def main(argv: list[str] | None = None) -> int:
    from encoders import PREFIXES, describe_encoder, list_encoders

    args = build_parser().parse_args(argv)
    rows = [describe_encoder(name) for name in list_encoders(args.pattern)]
    spellings = [{"name": key, "what": what, "family": family, "weights": weights}
                 for key, (what, family, weights) in PREFIXES.items()]
    if args.json:
        for row in rows + (spellings if args.pattern == "*" else []):
            print(json.dumps(row))
        return 0
    header = ("name", "family", "input", "grid", "D", "weights")
    table = [header] + [(r["name"], r["family"], f"{r['in_chans']}x{r['image_size']}", "x".join(map(str, r["grid"])),
                         str(r["feature_dim"]), r["weights"]) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    if args.pattern == "*":
        print("\nalso accepted by --encoder (input, grid and D come from the checkpoint):")
        width = max(len(s["name"]) for s in spellings)
        for s in spellings:
            print(f"  {s['name'].ljust(width)}  {s['what']}; family {s['family']}; weights: {s['weights']}")
    return 0
