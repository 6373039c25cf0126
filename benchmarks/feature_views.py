"""Augmenting a frozen encoder through the feature cache (`--feature-views N`): test accuracy against N = 0.

    .venv/bin/python benchmarks/feature_views.py                        # a fresh phantom (split by image)
    .venv/bin/python benchmarks/feature_views.py --views 0 8 --seeds 0 1 2 --epochs 15
    .venv/bin/python benchmarks/feature_views.py --data ../shared/data/vqa-rad --val-by question

Each seed trains the same head on the same frozen encoder with 0 and N augmented copies per training image,
seed by seed (the same validation carve and batch order), and evaluates on the test split. The phantom's test
images are new images; VQA-RAD's test images are all training images too (its split is by question), so there
the copies take away an exact match the head could otherwise learn (docs/results.md).
"""
from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path

from _common import dataset_or_phantom, head_benchmark_parser, percent_mean_std
from vqa.evaluate import evaluate
from vqa.train import TrainConfig, train


def main() -> None:
    p = head_benchmark_parser(__doc__, encoder="efficientnet-lite0-imagenet", head="mevf-ban")
    p.add_argument("--views", type=int, nargs="+", default=[0, 8], help="copies per image to compare (default: 0 8)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--val-by", default="image", choices=["image", "question"])
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    # The phantom and N copies' features of every image run to gigabytes: the folder goes when the benchmark ends.
    with tempfile.TemporaryDirectory(prefix="medvqa-feature-views-") as folder:
        scores = compare(args, Path(folder))
    print("| views | test overall (mean ± std) | paired gain over the first (mean ± std) |\n|---|---|---|")
    first = scores[args.views[0]]
    for views, s in scores.items():
        gains = [a - b for a, b in zip(s, first)]
        print(f"| {views} | {percent_mean_std(s)} | {percent_mean_std(gains, signed=True)} |")


def compare(args, tmp: Path) -> dict[int, list[float]]:
    """Test overall accuracy per number of views, one entry per seed."""
    data = dataset_or_phantom(args.data, tmp)
    base = TrainConfig(format=args.format, data=data, encoder=args.encoder, head=args.head, val_by=args.val_by,
                       head_args={"hidden_dim": args.hidden}, question_dim=args.hidden, loss="ce", lr=3e-3,
                       epochs=args.epochs, batch_size=args.batch_size, threads=args.threads, device="cpu",
                       cache_dir=str(tmp / "cache"), progress=False)
    scores: dict[int, list[float]] = {v: [] for v in args.views}
    for seed in args.seeds:
        for views in args.views:
            cfg = dataclasses.replace(base, seed=seed, feature_views=views, out=str(tmp / f"v{views}-s{seed}"))
            report, _, _ = evaluate(train(cfg), cfg.format, cfg.data, cache_dir=cfg.cache_dir, progress=False)
            scores[views].append(report["subsets"]["all"]["overall"])
            print(f"seed {seed}, {views} views: test overall {100 * scores[views][-1]:.1f}", flush=True)
    print(f"\n{args.format} ({data}): {args.head} on {args.encoder} frozen, {args.epochs} epochs, seeds {args.seeds}")
    return scores


if __name__ == "__main__":
    main()
