"""Head-training epoch time on cached features vs re-encoding images every step (as MEVF/QCR's code does).

Same encoder, head, batch and questions on both sides, measured in one run:

    .venv/bin/python benchmarks/feature_cache.py                       # phantom, ViT-B/32-sized encoder
    .venv/bin/python benchmarks/feature_cache.py --hidden 1024         # MEVF's head size
    .venv/bin/python benchmarks/feature_cache.py --format vqa-rad --data ../shared/data/vqa-rad

The re-encoding side runs the frozen encoder on preprocessed pixels held in RAM
(the references load pre-resized pixel pickles), so the ratio is the encoder's
cost alone, not image decoding. Epoch times are extrapolated from --steps batches.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
import time
from pathlib import Path

import torch

from _common import dataset_or_phantom, head_benchmark_parser
from vqa.batches import QuestionTensors
from vqa.data import load_records
from vqa.train import Split, TrainConfig, VQATask, build_model, make_split, vocabularies
from vqa.training import Runtime, Trainer, World

REFERENCE_EPOCH_SECONDS = {"MEVF (BAN, batch 32)": 136.0, "QCR (batch 64)": 169.0}  # TARGETS.md, this machine
REFERENCE_QUESTIONS = 3064  # VQA-RAD train, the references' epoch


def _first_questions(split: Split, n: int) -> Split:
    q = split.questions
    head = {f.name: getattr(q, f.name)[:n] if getattr(q, f.name) is not None else None
            for f in dataclasses.fields(QuestionTensors)}
    return Split(split.records[:n], QuestionTensors(**head), split.images)


def _time_epoch(cfg, model, split, answers, device) -> float:
    """One epoch of the engine's loop (`medvqa train`'s code) over `split`."""
    task = VQATask(cfg, model, split, split, answers, cfg.loss or model.head.default_loss, device, World())
    return Trainer(task, cfg, Runtime(device, World())).train_epoch(0)["seconds"]


def main() -> None:
    p = head_benchmark_parser(__doc__, encoder="clip-vit-b32", head="mevf-ban")
    p.add_argument("--image-features", default="pooled", choices=["grid", "pooled"],
                   help="pooled: CLIP's image vector as one region, as PubMedCLIP feeds MEVF/QCR (default)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--steps", type=int, default=10, help="batches timed on each side")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="medvqa-bench-") as folder:  # the phantom, cache and runs
        measure(args, Path(folder))


def measure(args, tmp: Path) -> None:
    """Cache the features under `tmp`, time an epoch on both sides and print the table."""
    data = dataset_or_phantom(args.data, tmp)
    cfg = TrainConfig(format=args.format, data=data, encoder=args.encoder, head=args.head,
                      image_features=args.image_features, head_args={"hidden_dim": args.hidden},
                      question_dim=args.hidden, precision=args.precision,
                      batch_size=args.batch_size, cache_dir=str(tmp / "cache"), out=str(tmp / "run"),
                      epochs=1, progress=False, device="cpu")
    device = torch.device("cpu")
    records = load_records(cfg.format, cfg.data, "train")
    words, answers = vocabularies(cfg, records)
    model = build_model(cfg, words, answers)
    n = min(len(records), args.steps * args.batch_size)
    t = time.perf_counter()
    cached = make_split(cfg, model, records, words, answers, device)
    cache_build = time.perf_counter() - t
    pixels = make_split(dataclasses.replace(cfg, encoder_mode="finetune"), model, records, words, answers, device)
    model.encoder.freeze()  # re-encoding side: the same frozen encoder, run on every step
    cached_s = _time_epoch(cfg, model, _first_questions(cached, n), answers, device)
    pixel_s = _time_epoch(cfg, model, _first_questions(pixels, n), answers, device)
    scale = len(records) / n
    epoch_cached, epoch_pixels = cached_s * scale, pixel_s * scale
    print(f"{cfg.format}: {len(records)} training questions, encoder {args.encoder}, head {args.head}, "
          f"hidden {args.hidden}, {args.precision}, {args.image_features} features, batch {args.batch_size}, timed {math.ceil(n / args.batch_size)} batches per side (CPU)")
    print(f"{'':34s} {'epoch (s)':>10s}")
    print(f"{'re-encode images every step':34s} {epoch_pixels:10.1f}")
    print(f"{'cached features':34s} {epoch_cached:10.2f}")
    print(f"{'speed-up (cached vs re-encode)':34s} {epoch_pixels / epoch_cached:10.1f}x")
    print(f"one-off feature caching: {cache_build:.1f}s for {len(cached.images['grid'])} images")
    # The references' epochs are VQA-RAD's 3,064 questions; compare per question.
    ours = epoch_cached * REFERENCE_QUESTIONS / len(records)
    for name, seconds in REFERENCE_EPOCH_SECONDS.items():
        print(f"vs reference {name} on VQA-RAD: {seconds:.0f}s/epoch, ours {ours:.1f}s per {REFERENCE_QUESTIONS} "
              f"questions -> {seconds / ours:.1f}x faster")


if __name__ == "__main__":
    main()
