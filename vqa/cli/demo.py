"""`medvqa demo`: the Gradio demo on a bundle, or on the shipped VQA-RAD model (`--default phantom`: a model
built once on phantom data, then cached)."""
from __future__ import annotations

import logging
import time

from .options import add_bundle_argument, add_device_arguments, add_runtime_argument, apply_runtime, command_parser

log = logging.getLogger(__name__)

EXAMPLE = """examples:
  medvqa demo                                   # the shipped model (VQA-RAD), no training
  medvqa demo --default phantom                 # the phantom model instead (trained once, then cached)
  medvqa demo --bundle runs/demo/bundle --port 7860
  medvqa demo --bundle org/name --runtime onnx  # a Hub model, its ONNX export run by onnxruntime
  medvqa demo --host 0.0.0.0 --port 8080        # reachable from other machines
  medvqa demo --build-shipped path/to/vqa-rad --glove runs/mevf/glove_300d.txt   # rebuild the shipped model

Without --bundle the demo serves the model shipped in demos/models/vqa-rad (trained on
VQA-RAD's train split; its card is demos/models/vqa-rad/README.md). `--default phantom`
builds a small model on phantom data the first time (a few minutes on 2 CPU cores) into
$MEDVQA_CACHE or ~/.cache/medvqa. Set GRADIO_ANALYTICS_ENABLED=False to keep Gradio offline."""


def build_parser():
    p = command_parser("medvqa demo", __doc__.split(": ", 1)[1], EXAMPLE)
    add_bundle_argument(p, required=False, help_default=" (default: the model --default names)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860; 0 picks a free one)")
    add_runtime_argument(p)
    add_device_arguments(p, device="cpu", threads=1, precision=False)
    p.add_argument("--max-upload-mb", type=int, default=200,
                   help="largest upload accepted (default: 200); images must also be under the pixel limit "
                        "(50 Mpx, or $MEDVQA_MAX_IMAGE_PIXELS)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (needs internet)")
    p.add_argument("--default", default="vqa-rad", choices=["vqa-rad", "phantom"],
                   help="the model without --bundle: the shipped VQA-RAD one, or one built on phantom data")
    p.add_argument("--build-shipped", metavar="VQA_RAD", default=None,
                   help="rebuild the shipped model from a VQA-RAD folder (then exit)")
    p.add_argument("--glove", default=None, help="with --build-shipped: GloVe vectors (`medvqa import mevf`)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars while building the default model")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own startup requests
    from demos.app import build_demo, launch

    from ..errors import DataError
    from ..predictor import Predictor

    device = apply_runtime(args)  # threads also for building the default model: small steps, shared cores
    if args.build_shipped:
        from demos.shipped_model import SHIPPED_BUNDLE, build_shipped_model

        if device.type != "cpu":  # its recipe, card and figures are a CPU run's
            raise DataError(f"--build-shipped trains on the CPU, as the shipped model's recipe does (not {device})")

        numbers = build_shipped_model(args.build_shipped, args.glove, threads=args.threads,
                                      progress=not args.no_progress)
        print(f"medvqa demo: rebuilt {SHIPPED_BUNDLE} (VQA-RAD test: {numbers})")
        return 0
    started = time.perf_counter()
    bundle = args.bundle
    if bundle is None and args.default == "vqa-rad":
        from demos.shipped_model import SHIPPED_BUNDLE

        if (SHIPPED_BUNDLE / "config.json").is_file():
            bundle = SHIPPED_BUNDLE
        else:
            log.warning("%s: no shipped model (rebuild it with --build-shipped); using the phantom model",
                        SHIPPED_BUNDLE)
    if bundle is None:
        from demos.default_model import ensure_default_bundle

        bundle = ensure_default_bundle(progress=not args.no_progress)
    predictor = Predictor.from_pretrained(bundle, runtime=args.runtime, device=device, threads=args.threads)
    demo = build_demo(predictor)
    port = args.port or _free_port(args.host)
    print(f"medvqa demo: model {bundle} ready in {time.perf_counter() - started:.1f}s", flush=True)
    try:
        launch(demo, host=args.host, port=port, max_upload_mb=args.max_upload_mb, share=args.share, quiet=True,
               prevent_thread_lock=True)
    except OSError as e:  # the port is taken, or the host cannot be bound
        raise DataError(f"cannot serve on {args.host}:{port} ({e}); pass another --port, or --port 0 "
                        "for a free one") from None
    shown = "127.0.0.1" if args.host == "0.0.0.0" else args.host
    print(f"medvqa demo: open http://{shown}:{port} (Ctrl+C to stop)", flush=True)
    if args.share and demo.share_url:
        print(f"medvqa demo: public link {demo.share_url}", flush=True)
    demo.block_thread()  # until Ctrl+C
    return 0


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
