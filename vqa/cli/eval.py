"""`medvqa eval`: score a bundle on a benchmark split with the published protocol; JSON, Markdown, plots."""
from __future__ import annotations

from pathlib import Path

from .options import (add_bundle_argument, add_dataset_arguments, add_device_arguments, add_format_argument,
                      apply_runtime, command_parser)

EXAMPLE = """examples:
  medvqa eval --bundle runs/ban/bundle --format vqa-rad --data runs/phantom/vqa-rad
  medvqa eval --bundle runs/slake-qcr/bundle --format slake --data path/to/Slake1.0 --out runs/slake-qcr/test
  medvqa eval --bundle org/name --format vqa-rad --data path/to/vqa-rad     # a model on the Hugging Face Hub

VQA-RAD's test split is scored on all questions and on MEVF's freeform subset. OUT gets
metrics.json, report.md, predictions.jsonl (each answer with its score) and plots. The default
OUT, inside the bundle, is where the model card (`medvqa push`) finds test results."""


def build_parser():
    p = command_parser("medvqa eval", __doc__.split(": ", 1)[1], EXAMPLE)
    add_bundle_argument(p)
    g = p.add_argument_group("data")
    add_format_argument(g)
    add_dataset_arguments(g)
    g.add_argument("--split", default="test")
    g.add_argument("--cache-dir", default=None, help="feature cache root (default: $MEDVQA_CACHE/features)")
    g = p.add_argument_group("runtime")
    add_device_arguments(g)
    p.add_argument("--out", default=None, help="output folder (default: BUNDLE/eval-FORMAT-SPLIT; for a Hub id, "
                                               "runs/ORG--NAME/eval-FORMAT-SPLIT)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ..evaluate import evaluate, markdown_report, write_outputs

    device = apply_runtime(args)
    report, records, preds = evaluate(args.bundle, args.format, args.data, args.split, args.lang, str(device),
                                      args.precision, args.cache_dir, not args.no_progress)
    out = write_outputs(report, records, preds, args.out or default_out(args.bundle, args.format, args.split))
    print(markdown_report(report))
    print(f"wrote {out}/metrics.json, report.md, predictions.jsonl and plots")
    return 0


def default_out(bundle: str, fmt: str, split: str) -> Path:
    """Inside a local bundle; for a Hub id under runs/ (never inside the hub cache)."""
    from ..hub import is_repo_id

    base = Path("runs") / bundle.replace("/", "--") if is_repo_id(bundle) else Path(bundle)
    return base / f"eval-{fmt}-{split}"
