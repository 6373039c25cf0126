"""`medvqa data stats DIR --format F`: what a dataset holds and how far guessing gets."""
from __future__ import annotations

import argparse
import json

from ..errors import DataError
from .options import add_dataset_arguments, add_format_argument, command_parser

EXAMPLE = """examples:
  medvqa data stats runs/phantom/vqa-rad --format vqa-rad
  medvqa data stats path/to/vqa-rad --format vqa-rad --freeform --json
  medvqa data stats path/to/Slake1.0 --format slake --lang en"""


def build_parser():
    p = command_parser("medvqa data", "Dataset utilities.", EXAMPLE)
    sub = p.add_subparsers(dest="action", required=True)
    s = sub.add_parser("stats", help="counts, closed/open share, answer distribution, majority baselines",
                       epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_arguments(s, data_positional=True)
    add_format_argument(s)
    s.add_argument("--splits", nargs="+", default=None, help="splits to read (default: all of the format's)")
    s.add_argument("--strict", action="store_true",
                   help="refuse a question with an empty question or answer (default: skip it, and count it)")
    s.add_argument("--freeform", action="store_true", help="VQA-RAD: only freeform questions (MEVF's subset)")
    s.add_argument("--json", action="store_true", help="print JSON instead of text")
    return p


def main(argv: list[str] | None = None) -> int:
    from ..data import dataset_format, load_records
    from ..stats import dataset_stats, format_stats, templated_in_train

    args = build_parser().parse_args(argv)
    kwargs = {"lang": args.lang, "strict": args.strict}
    if args.freeform:
        if args.format != "vqa-rad":
            raise DataError("--freeform applies to --format vqa-rad only")
    names = args.splits or dataset_format(args.format).splits
    skipped: dict[str, list[str]] = {name: [] for name in names}
    # MEVF's subset is of test: its models train on the whole of train, whose baselines and coverage these are
    splits = {name: load_records(args.format, args.root, name, skipped=skipped[name], **kwargs,
                                 **({"freeform_only": True} if args.freeform and name == "test" else {}))
              for name in names}
    report = dataset_stats(splits, skipped=skipped)
    if args.format == "vqa-rad" and {"train", "test"} <= set(names) and not args.freeform:
        templated = templated_in_train(args.root)  # needs the release's JSON beside MEVF's split files
        if templated is not None:
            report["test_templated_in_train"] = templated
    print(json.dumps(report, indent=2) if args.json else format_stats(report))
    return 0
