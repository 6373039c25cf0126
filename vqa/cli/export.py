"""`medvqa export onnx`: a bundle's image encoder and head as ONNX graphs, for onnxruntime."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .options import add_device_arguments, apply_runtime, command_parser

EXAMPLE = """examples:
  medvqa export onnx runs/qcr/bundle                     # writes runs/qcr/bundle/onnx
  medvqa export onnx runs/qcr/bundle runs/qcr-onnx --overwrite
  medvqa predict --bundle runs/qcr/bundle --runtime onnx --image scan.png --question "Is there a lesion?"

OUT gets encoder.onnx (pixels -> grid, pooled), head.onnx (features + question tokens + lengths
[+ choices] -> logits, attention[, type_logits]), config.json with the preprocessing, and the
bundle's answers, vocabulary, metrics, calibration and out-of-scope detector (with
ood_encoder.onnx where the detector reads an encoder of its own, --ood-encoder). The graphs are
checked against PyTorch on sample inputs (the largest difference is printed). Exported inside
the bundle (the default OUT), `medvqa push` uploads it with the bundle and `--runtime onnx`
finds it. Needs `pip install 'medvqa[onnx]'` (onnx, onnxruntime)."""


def build_parser():
    p = command_parser("medvqa export", __doc__.split(": ", 1)[1], EXAMPLE)
    sub = p.add_subparsers(dest="target", required=True)
    s = sub.add_parser("onnx", help="image encoder + head as ONNX graphs, with the files the runtime needs",
                       epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("bundle", help="bundle folder (`medvqa train`'s OUT/bundle) or a Hugging Face Hub id org/name")
    s.add_argument("out", nargs="?", default=None, help="output folder (default: BUNDLE/onnx)")
    s.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    s.add_argument("--opset", type=int, default=17, help="ONNX opset (default: %(default)s)")
    add_device_arguments(s, device=None, threads=1, precision=False)  # the export traces on the CPU
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ..errors import DataError
    from ..hub import is_repo_id, resolve_bundle
    from ..onnx_export import export_onnx

    apply_runtime(args)
    if args.out is None and is_repo_id(args.bundle):
        raise DataError(f"{args.bundle}: a Hub model lives in the hub cache; give an output folder")
    bundle = resolve_bundle(args.bundle)
    report = export_onnx(bundle, args.out or Path(bundle) / "onnx", overwrite=args.overwrite, opset=args.opset)
    print(json.dumps({"out": str(report.folder), "head_inputs": report.head_inputs, "head_outputs": report.head_outputs,
                      "max_abs_diff_vs_torch": report.max_abs_diff}, indent=2))
    return 0
