"""`medvqa eval`: score a bundle (or a CLIP model zero-shot) on a benchmark split with the published protocol."""
from __future__ import annotations

from pathlib import Path

from .options import (add_bundle_argument, add_dataset_arguments, add_device_arguments, add_format_argument,
                      apply_runtime, command_parser)

EXAMPLE = """examples:
  medvqa eval --bundle runs/ban/bundle --format vqa-rad --data runs/phantom/vqa-rad
  medvqa eval --bundle runs/slake-qcr/bundle --format slake --data path/to/Slake1.0 --out runs/slake-qcr/test
  medvqa eval --bundle org/name --format vqa-rad --data path/to/vqa-rad     # a model on the Hugging Face Hub
  medvqa eval --zero-shot-clip runs/pretrain/clip --format pmc-vqa --data runs/phantom/pmc-vqa
  medvqa eval --zero-shot-clip hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 \
      --format pmc-vqa --data path/to/PMC-VQA --prompt "{choice}" --prompt "Question: {question} Answer: {choice}"

VQA-RAD's test split is scored on all questions and on MEVF's freeform subset. OUT gets
metrics.json, report.md, predictions.jsonl (each answer with its score) and plots. The default
OUT, inside the bundle, is where the model card (`medvqa push`) finds test results.
--zero-shot-clip scores multiple-choice questions (PMC-VQA) with no VQA training: each choice by
the cosine similarity of the image and a prompt holding it (by default "{choice}" and
"{question} {choice}", both measured), accuracy against chance; OUT defaults to
zero-shot-FORMAT-SPLIT beside the model's folder (under runs/ORG--NAME/ for a hub id)."""


def build_parser():
    p = command_parser("medvqa eval", __doc__.split(": ", 1)[1], EXAMPLE)
    add_bundle_argument(p, required=False, help_default="; or --zero-shot-clip")
    g = p.add_argument_group("zero-shot multiple choice (instead of --bundle)")
    g.add_argument("--zero-shot-clip", default=None, metavar="MODEL",
                   help="a CLIP model (`medvqa pretrain`'s OUT/clip, a CLIPModel folder or hub id, hf-hub:, "
                        "local-dir:, an OpenAI-format file): each choice scored by image-text similarity, no VQA "
                        "training")
    g.add_argument("--prompt", action="append", default=None, metavar="TEMPLATE",
                   help="a prompt per choice with {choice} and optionally {question} (repeatable; the first is the "
                        "headline; default: '{choice}' and '{question} {choice}', both measured)")
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
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.bundle is None) == (args.zero_shot_clip is None):
        parser.error("pass one of --bundle (a trained model) or --zero-shot-clip (a CLIP model, multiple choice)")
    if args.prompt and args.bundle:
        parser.error("--prompt goes with --zero-shot-clip")
    if args.zero_shot_clip and args.precision != "fp32":
        parser.error("--precision goes with --bundle: --zero-shot-clip embeds in fp32")
    if args.zero_shot_clip:
        return zero_shot(args)
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


def zero_shot(args) -> int:
    from pretrain.zero_shot_choice import evaluate_zero_shot_choice, markdown, write_outputs

    device = apply_runtime(args)
    report, records, predictions = evaluate_zero_shot_choice(
        args.zero_shot_clip, args.format, args.data, args.split, args.lang, args.prompt, str(device), args.cache_dir,
        not args.no_progress)
    out = write_outputs(report, records, predictions,
                        args.out or zero_shot_out(args.zero_shot_clip, args.format, args.split))
    print(markdown(report))
    print(f"wrote {out}/metrics.json, report.md and predictions.jsonl")
    return 0


def zero_shot_out(model: str, fmt: str, split: str) -> Path:
    """Beside a local model folder (in its pretraining run), under runs/ for a hub id or prefixed source."""
    name = f"zero-shot-{fmt}-{split}"
    path = Path(model)
    if path.exists():
        return path.resolve().parent / name
    return Path("runs") / model.split(":", 1)[-1].replace("/", "--") / name
