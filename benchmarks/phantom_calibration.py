"""Confidence on the phantom, head by head: what docs/results.md measures on VQA-RAD, on data anyone can make.

    .venv/bin/python benchmarks/phantom_calibration.py --threads 1          # 5 heads x 3 seeds, ~30 min
    .venv/bin/python benchmarks/phantom_calibration.py --heads mevf-ban qcr --seeds 0 --epochs 4

Each head trains on a fresh 400-image phantom (seed 1; its test images are new images) over the frozen ImageNet
EfficientNet-Lite0 grid with GRU questions, seed by seed (training order and validation carve), and is scored by
`medvqa eval` on the test split: closed and open ECE (15 bins) of the raw score, of temperature scaling alone
and with trust scores, beside the ECE a perfectly calibrated model shows on the same confidences; AURC;
coverage at 5% / 10% risk (closed) and 20% (open); and what the bundle answers at its 10% target, fitted on
validation. Mean ± std over the seeds. Writes the table to docs/phantom_calibration.md (--out).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import tempfile
from pathlib import Path

from _common import mean_std, percent_mean_std
from vqa.data.record import CLOSED, OPEN
from vqa.evaluate import evaluate
from vqa.train import TrainConfig, train

HEADS = {  # the real-data recipe's heads at phantom size
    "mevf-ban": {}, "mevf-san": {}, "qcr": {},
    "fusion-transformer": {"layers": 2, "attention_heads": 4, "hidden_dim": 128},
    "fusion-transformer-qcr": {"layers": 2, "attention_heads": 4, "hidden_dim": 128},
}
ADAMW = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.01}  # the transformer heads' optimiser, as on VQA-RAD


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "phantom_calibration.md")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="medvqa-phantom-calibration-") as folder:
        runs = measure(args, Path(folder))
    text = render(runs, args)
    args.out.write_text(text)
    print(text)


def measure(args, tmp: Path) -> dict[str, list[dict]]:
    """head -> one `medvqa eval` report per seed."""
    from vqa.phantom import generate_phantom

    generate_phantom(tmp / "phantom", args.images, seed=1, workers=0)
    base = TrainConfig(data=str(tmp / "phantom" / "vqa-rad"), encoder="efficientnet-lite0-imagenet", loss="ce",
                       question_dim=128, embed_dim=64, batch_size=32, lr=3e-3, epochs=args.epochs,
                       threads=args.threads, device="cpu", cache_dir=str(tmp / "cache"), progress=False)
    runs: dict[str, list[dict]] = {}
    for head in args.heads:
        for seed in args.seeds:
            extra = ADAMW if head.startswith("fusion-transformer") else {}
            cfg = dataclasses.replace(base, head=head, seed=seed, val_seed=seed, out=str(tmp / f"{head}-{seed}"),
                                      head_args={"hidden_dim": 256, **HEADS[head]}, **extra)
            report, _, _ = evaluate(train(cfg), cfg.format, cfg.data, cache_dir=cfg.cache_dir, progress=False)
            runs.setdefault(head, []).append(report)
            print(f"{head}, seed {seed}: test overall {100 * report['subsets']['all']['overall']:.1f}", flush=True)
    return runs


def render(runs: dict[str, list[dict]], args) -> str:
    lines = ["# Confidence on the phantom", "",
             f"`python benchmarks/phantom_calibration.py --epochs {args.epochs} --images {args.images} --seeds "
             f"{' '.join(map(str, args.seeds))}`: each head on a {args.images}-image phantom (seed 1, test images "
             "unseen), frozen ImageNet EfficientNet-Lite0 grid, GRU questions, "
             f"{args.epochs} epochs, the epoch and the calibration chosen on a validation carve, never on test; "
             "mean ± std over the seeds. ECE over 15 bins on the test split's closed and open questions (the "
             "dataset's type): the raw score → temperature scaling → with trust scores, and in brackets what a "
             "perfectly calibrated model shows on the same confidences (sampling noise). Coverage: the share of "
             "test questions answerable at that risk (the test's own risk-coverage curve), temperature scaling → "
             "with trust scores. Abstention: what the bundle answers at its validation-chosen 10% target "
             "(share answered, and wrong among them).", "",
             "| head | seeds | test overall | closed ECE | open ECE | AURC closed / open | closed coverage at 5% risk "
             "| at 10% | open at 20% | at the 10% target: closed answered (wrong) / open |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for head, reports in runs.items():
        groups = [r["calibration"]["groups"] for r in reports]

        def ece(t):
            parts = [mean_std([g[t][k]["ece"] for g in groups]) for k in ("before", "temperature_only", "after")
                     if all(k in g[t] for g in groups)]
            return " → ".join(parts) + f" ({mean_std([g[t]['after']['ece_if_calibrated']['mean'] for g in groups])})"

        def coverage(t, risk):
            return " → ".join(percent_mean_std([g[t][k]["coverage_at_risk"][risk] for g in groups])
                              for k in ("temperature_only", "after") if all(k in g[t] for g in groups))

        def answered(t):
            ab = [r["calibration"]["abstention"][t] for r in reports]
            wrong = [a["risk"] for a in ab if a["risk"] is not None]
            return percent_mean_std([a["coverage"] for a in ab]) + (
                f" ({100 * statistics.fmean(wrong):.1f})" if wrong else "")
        lines.append(f"| {head} | {len(reports)} | {percent_mean_std([r['subsets']['all']['overall'] for r in reports])} "
                     f"| {ece(CLOSED)} | {ece(OPEN)} | {mean_std([g[CLOSED]['after']['aurc'] for g in groups])} / "
                     f"{mean_std([g[OPEN]['after']['aurc'] for g in groups])} | {coverage(CLOSED, '0.05')} | "
                     f"{coverage(CLOSED, '0.1')} | {coverage(OPEN, '0.2')} | {answered(CLOSED)} / {answered(OPEN)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
