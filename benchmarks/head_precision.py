"""Head training per precision: median epoch time (as a ratio to fp32) and the test accuracy it reaches.

    .venv/bin/python benchmarks/head_precision.py                          # phantom, CPU: fp32 vs bf16
    python benchmarks/head_precision.py --device cuda --encoder clip-vit-b32  # GPU: fp32, bf16, fp16
    .venv/bin/python benchmarks/head_precision.py --data ../shared/data/vqa-rad --threads 1
    .venv/bin/python benchmarks/head_precision.py --threads 1 --epochs 3 \
        --config runs/real/vqa/t-fusion-transformer-qcr-frozen-train-qminilm-tfqcr/run_config.json  # a run's recipe

Each precision trains the same head from the same seed on the same cached features
(`medvqa train`'s code path, `vqa.train.train`) and is evaluated on the test split
with `vqa.evaluate.evaluate`, so the table answers both "how much faster" and
"does it still learn". The frozen encoder's features are cached once and shared.
With --config, a recorded run's whole recipe (its run_config.json: encoder, head,
question encoder, optimizer, data, feature cache) is trained instead, for --epochs.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import tempfile
from pathlib import Path

import torch

from _common import dataset_or_phantom, head_benchmark_parser
from vqa.cli.options import read_recorded_config
from vqa.evaluate import evaluate
from vqa.training import resolve_device
from vqa.train import TrainConfig, train


def run_precision(cfg: TrainConfig, precision: str) -> dict:
    """Train with `precision`; median epoch seconds and test accuracy (open/closed/overall)."""
    out = Path(cfg.out) / precision
    bundle = train(dataclasses.replace(cfg, precision=precision, out=str(out)))
    history = json.loads((out / "history.json").read_text())
    report, _, _ = evaluate(bundle, cfg.format, cfg.data, cache_dir=cfg.cache_dir, progress=False)
    return {"epoch_s": statistics.median(h["seconds"] for h in history), "subsets": report["subsets"]}


def measure(args, device: torch.device, precisions: list[str], tmp: Path) -> tuple[TrainConfig, dict]:
    """The recipe (--config's, else the options') and its numbers per precision, its runs (and the phantom and
    feature cache, unless --data and --config name them) made under `tmp`."""
    run = dict(epochs=args.epochs, device=str(device), threads=args.threads, out=str(tmp / "runs"), progress=False)
    if args.config:
        recorded = read_recorded_config(TrainConfig, args.config)
        cfg = TrainConfig(**{**recorded, "resume": None, "stop_after": None, **run,
                             **({"data": args.data} if args.data else {})})
    else:
        cfg = TrainConfig(format=args.format, data=dataset_or_phantom(args.data, tmp), encoder=args.encoder,
                          head=args.head, head_args={"hidden_dim": args.hidden}, question_dim=args.hidden, loss="ce",
                          lr=3e-3, batch_size=args.batch_size, cache_dir=str(tmp / "cache"), **run)
    return cfg, {precision: run_precision(cfg, precision) for precision in precisions}


def main() -> None:
    p = head_benchmark_parser(__doc__, encoder="timm:resnet10t", head="qcr")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--device", default="auto")
    p.add_argument("--precisions", default=None, help="comma list (default: fp32,bf16 [+fp16 on a GPU])")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: one per core)")
    p.add_argument("--config", metavar="FILE", default=None,
                   help="a recorded run's run_config.json: its recipe in place of --encoder/--head/--hidden/"
                        "--batch-size (--data, when given, and --epochs, --threads, --device still apply)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = resolve_device(args.device)
    precisions = (args.precisions.split(",") if args.precisions
                  else ["fp32", "bf16"] + (["fp16"] if device.type == "cuda" else []))
    with tempfile.TemporaryDirectory(prefix="medvqa-head-precision-") as folder:
        cfg, rows = measure(args, device, precisions, Path(folder))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{cfg.format} ({cfg.data}): head {cfg.head} {cfg.head_args}, question {cfg.question_encoder} "
          f"({cfg.question_mode}), encoder {cfg.encoder} {cfg.encoder_mode}, {cfg.optimizer} lr {cfg.lr}, "
          f"batch {cfg.batch_size}, {cfg.epochs} epochs, {where}")
    base = rows[precisions[0]]["epoch_s"]
    subsets = list(rows[precisions[0]]["subsets"])
    print(f"{'precision':>9} | {'epoch (s)':>9} | {'speed-up':>8} | " +
          " | ".join(f"{s + ' open/closed/overall':>28}" for s in subsets))
    for precision, r in rows.items():
        cells = [" / ".join(f"{100 * (r['subsets'][s].get(k) or 0):.1f}" for k in ("open", "closed", "overall"))
                 for s in subsets]
        print(f"{precision:>9} | {r['epoch_s']:9.3f} | {base / r['epoch_s']:7.2f}x | " +
              " | ".join(f"{c:>28}" for c in cells))
    if args.json:
        args.json.write_text(json.dumps({"device": where, "data": cfg.data,
                                         "args": {k: str(v) for k, v in vars(args).items()},
                                         "rows": {k: {"epoch_s": v["epoch_s"], **{
                                             s: {m: v["subsets"][s].get(m) for m in ("open", "closed", "overall")}
                                             for s in v["subsets"]}} for k, v in rows.items()}}, indent=1))


if __name__ == "__main__":
    main()
