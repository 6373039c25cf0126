"""`medvqa ensemble`: several bundles of one recipe (different seeds) as one bundle, calibrated on their validation split."""
from __future__ import annotations

from .options import (add_device_arguments, add_recorded_data_arguments, add_target_risk_argument,
                      add_weights_dtype_argument, apply_runtime, command_parser, config_from_args)

EXAMPLE = """examples:
  for s in 0 10 20; do
    medvqa train --format vqa-rad --data path/to/vqa-rad --val-by question --head fusion-transformer-qcr \\
        --question-encoder minilm --seed $s --val-seed 0 --out runs/member-$s
  done
  medvqa ensemble runs/member-0/bundle runs/member-10/bundle runs/member-20/bundle \\
      --format vqa-rad --data path/to/vqa-rad --out runs/ensemble
  medvqa eval --bundle runs/ensemble/bundle --format vqa-rad --data path/to/vqa-rad

The members must share the image encoder, tokenizer, answer vocabulary, training data and
validation split (train them with one --val-seed and different --seed); the ensemble averages
their answer distributions and fits its calibration and abstention threshold on that validation
split, which no member trained on. Bundles trained before --val-seed existed do not record how
their validation was carved: pass --val-split/--val-fraction/--val-by/--val-seed as they were
trained (checked against the description each member recorded). OUT/bundle is an ordinary bundle
for eval, predict, the demo, export and push.

--bagging takes members trained on different validation carves instead (e.g. --seed 0, 1, 2 with
no --val-seed): each trained on another 90% of train, so together they have seen all of it. Several
members per carve (e.g. --seed 0 and 10 with --val-seed 0, --seed 1 and 11 with --val-seed 1) are
calibrated on each carve as the ensemble of that carve's members answers."""


def build_parser():
    p = command_parser("medvqa ensemble", __doc__.split(": ", 1)[1], EXAMPLE)
    p.add_argument("members", nargs="+", metavar="BUNDLE", help="member bundle folders (or Hub ids), at least 2")
    add_recorded_data_arguments(p, "the members'")
    g = p.add_argument_group("members")
    g.add_argument("--bagging", action="store_true",
                   help="members trained on different validation carves (--val-seed), so that together they have "
                        "trained on all of the training split; the ensemble answers over all their answers and is "
                        "calibrated, split by split, on the answers of the members held out on it (their mean where "
                        "several share a carve), pooled (a proxy: no validation question is unseen by every member)")
    g = p.add_argument_group("calibration")
    add_target_risk_argument(g, "the first member's")
    add_weights_dtype_argument(g, "calibration")
    g = p.add_argument_group("runtime")
    add_device_arguments(g, precision=False)  # calibrated in the precision the bundle answers in: fp32
    p.add_argument("--out", required=True, help="output folder: OUT/bundle is written")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ..ensemble import EnsembleConfig, build_ensemble

    apply_runtime(args)
    bundle = build_ensemble(config_from_args(EnsembleConfig, args))
    print(f"wrote {bundle} ({len(args.members)} members)")
    return 0
