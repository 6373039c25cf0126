"""`medvqa calibrate`: fit a trained bundle's calibration again on the validation split it recorded (trust scores for bundles trained before them)."""
from __future__ import annotations

from .options import (add_device_arguments, add_ood_encoder_argument, add_recorded_data_arguments,
                      add_target_risk_argument, apply_runtime, command_parser, config_from_args)

EXAMPLE = """examples:
  medvqa calibrate runs/qcr/bundle --format vqa-rad --data path/to/vqa-rad
  medvqa calibrate my-org/qcr-vqa-rad --format vqa-rad --data path/to/vqa-rad --out runs/qcr-calibrated
  medvqa calibrate runs/qcr/bundle --format vqa-rad --data path/to/vqa-rad --ood-encoder efficientnet-lite0-imagenet
  medvqa eval --bundle runs/qcr/bundle --format vqa-rad --data path/to/vqa-rad

The bundle's answers to its own training and validation questions (rebuilt from what it
records, and checked against it) give what `medvqa train` fits after training: temperatures per
branch, the trust memory and its weights (heads with a fused vector), and the abstention
evidence; with --ood-encoder, the out-of-scope detector too, in that space. The network is
untouched. Use it on bundles trained before trust scores (or before calibration). A refit
bundle (--refit) has no validation question left and is refused; an
ensemble is calibrated by `medvqa ensemble`."""


def build_parser():
    p = command_parser("medvqa calibrate", __doc__.split(": ", 1)[1], EXAMPLE)
    p.add_argument("bundle", metavar="BUNDLE", help="bundle folder (or a Hub id, with --out)")
    add_recorded_data_arguments(p, "the bundle's")
    g = p.add_argument_group("calibration")
    add_target_risk_argument(g, "the bundle's")
    add_ood_encoder_argument(g, "keep the bundle's detector; given, the detector is fitted again on the training "
                                "images in that space")
    g = p.add_argument_group("runtime")
    add_device_arguments(g, precision=False)  # calibrated in the precision the bundle answers in: fp32
    p.add_argument("--out", default=None, help="write OUT/bundle, a calibrated copy (default: into BUNDLE itself)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ..recalibrate import RecalibrateConfig, recalibrate

    apply_runtime(args)
    bundle = recalibrate(config_from_args(RecalibrateConfig, args))
    print(f"calibrated {bundle}")
    return 0
