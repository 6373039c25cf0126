"""Confidence on the phantom, head by head: what docs/results.md measures on VQA-RAD, on data anyone can make.

    .venv/bin/python benchmarks/phantom_calibration.py --threads 1          # 5 heads x 3 seeds, about an hour
    .venv/bin/python benchmarks/phantom_calibration.py --heads mevf-ban qcr --seeds 0 --epochs 4
    .venv/bin/python benchmarks/phantom_calibration.py --render             # the tables again from the .json

Each head trains on a fresh 400-image phantom (seed 1; its test images are new images) over the frozen ImageNet
EfficientNet-Lite0 grid with GRU questions, seed by seed (training order and validation carve), and is scored by
`medvqa eval` on the test split: closed and open ECE (15 bins) and Brier score of the raw score, of temperature
scaling alone and with trust scores, each ECE beside the one a perfectly calibrated model shows on the same
confidences; AURC; coverage at 5% / 10% risk (closed) and 20% (open); and what the bundle answers at its 10%
target, fitted on validation. Mean ± std over the seeds. Writes the tables to docs/phantom_calibration.md (--out)
and what they are made of, each seed's scores, beside it as .json (--render reads it back).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import tempfile
from pathlib import Path

from _common import mean_std, percent_mean_std
from vqa.data.record import CLOSED, OPEN
from vqa.io import atomic_write, atomic_write_json

STAGES = ("before", "temperature_only", "after")  # the raw score, temperature scaling, with trust scores

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
    p.add_argument("--render", action="store_true", help="only rewrite --out from the scores beside it (.json)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    scores = args.out.with_suffix(".json")
    if args.render:
        if not scores.is_file():
            p.error(f"--render reads {scores}, which is not there: run without --render first")
        measured = json.loads(scores.read_text())
    else:
        with tempfile.TemporaryDirectory(prefix="medvqa-phantom-calibration-") as folder:
            runs = measure(args, Path(folder))
        measured = {"epochs": args.epochs, "images": args.images, "seeds": args.seeds, "runs": runs}
        atomic_write_json(scores, measured)
    text = render(measured)
    with atomic_write(args.out) as f:
        f.write(text)
    print(text)


def measure(args, tmp: Path) -> dict[str, list[dict]]:
    """head -> per seed, what the tables read of its `medvqa eval` report."""
    from vqa.evaluate import evaluate
    from vqa.phantom import generate_phantom
    from vqa.train import TrainConfig, train

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
            runs.setdefault(head, []).append(kept(report))
            print(f"{head}, seed {seed}: test overall {100 * report['subsets']['all']['overall']:.1f}", flush=True)
    return runs


def kept(report: dict) -> dict:
    """What the tables read of an evaluation report: accuracy, each stage's calibration scores, the abstention."""
    cal = report["calibration"]
    return {"overall": report["subsets"]["all"]["overall"], "abstention": cal["abstention"],
            "groups": {t: {k: cal["groups"][t][k] for k in STAGES if k in cal["groups"][t]} for t in (CLOSED, OPEN)}}


def _stages(groups: list[dict], answer_type: str, cell, stages: tuple[str, ...] = STAGES) -> str:
    """One cell per stage every seed has, of its scores over the seeds, joined by arrows."""
    return " → ".join(cell([g[answer_type][k] for g in groups]) for k in stages
                      if all(k in g[answer_type] for g in groups))


def render(measured: dict) -> str:
    """The two tables, calibration and selective answering, from `measured` (what `main` writes as .json)."""
    runs, epochs, images = measured["runs"], measured["epochs"], measured["images"]
    lines = ["# Confidence on the phantom", "",
             f"`python benchmarks/phantom_calibration.py --epochs {epochs} --images {images} --seeds "
             f"{' '.join(map(str, measured['seeds']))}`: each head on a {images}-image phantom (seed 1, test images "
             f"unseen), frozen ImageNet EfficientNet-Lite0 grid, GRU questions, {epochs} epochs, the epoch and the "
             "calibration chosen on a validation carve (10% of the training images), never on test; mean ± std over "
             "the seeds.", "",
             "## Calibration", "",
             "On the test split's closed and open questions (the dataset's type), three confidences: the raw score "
             "→ temperature scaling → with trust scores. ECE over 15 bins, and in brackets what a perfectly "
             "calibrated model shows on the same confidences (sampling noise alone: it is lower for sharp "
             "confidences than for hedged ones, so each stage has its own). Brier score: the mean squared gap "
             "between confidence and right (1) or wrong (0), a proper score, lower is better.", "",
             "| head | seeds | test overall | closed ECE (if calibrated) | open ECE (if calibrated) | closed Brier | "
             "open Brier |", "|---|---|---|---|---|---|---|"]
    def ece(scores: list[dict]) -> str:
        return f"{mean_std([s['ece'] for s in scores])} ({mean_std([s['ece_if_calibrated']['mean'] for s in scores])})"

    def brier(scores: list[dict]) -> str:
        return mean_std([s["brier"] for s in scores])
    for head, seeds in runs.items():
        g = [s["groups"] for s in seeds]
        lines.append(f"| {head} | {len(seeds)} | {percent_mean_std([s['overall'] for s in seeds])} | "
                     f"{_stages(g, CLOSED, ece)} | {_stages(g, OPEN, ece)} | {_stages(g, CLOSED, brier)} | "
                     f"{_stages(g, OPEN, brier)} |")
    lines += ["", "## Selective answering", "",
              "AURC with trust scores. Coverage: the share of test questions answerable at that risk (the test's own "
              "risk-coverage curve), temperature scaling → with trust scores. Abstention: what the bundle answers at "
              "its validation-chosen 10% target (share answered, and wrong among them, %).", "",
              "| head | AURC closed / open | closed coverage at 5% risk | at 10% | open at 20% | at the 10% target: "
              "closed answered (wrong) / open |", "|---|---|---|---|---|---|"]
    for head, seeds in runs.items():
        groups = [s["groups"] for s in seeds]

        def coverage(t: str, risk: str) -> str:
            return _stages(groups, t, lambda scores: percent_mean_std([s["coverage_at_risk"][risk] for s in scores]),
                           STAGES[1:])

        def answered(t: str) -> str:
            ab = [s["abstention"][t] for s in seeds]
            wrong = [a["risk"] for a in ab if a["risk"] is not None]
            return percent_mean_std([a["coverage"] for a in ab]) + (
                f" ({100 * statistics.fmean(wrong):.1f})" if wrong else "")
        lines.append(f"| {head} | {mean_std([g[CLOSED]['after']['aurc'] for g in groups])} / "
                     f"{mean_std([g[OPEN]['after']['aurc'] for g in groups])} | {coverage(CLOSED, '0.05')} | "
                     f"{coverage(CLOSED, '0.1')} | {coverage(OPEN, '0.2')} | {answered(CLOSED)} / {answered(OPEN)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
