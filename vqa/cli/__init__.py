"""`medvqa`: one entry point; each command lives in its own module of this package with `main(argv)`.

The CLI layer is the only place with argparse and printing; the libraries (`vqa`, `encoders`,
`heads`, `pretrain`, `demos`) return values and raise errors. Being the outermost layer, its
modules may import every package (lazily, inside `main`, so `--help` stays instant).
"""
from __future__ import annotations

import importlib
import logging
import os
import sys

from ..errors import DataError

# name -> (module with main(argv), one-line summary). Imported lazily so `--help` is instant
# and a command never pays for another's dependencies.
COMMANDS = {
    "phantom": ("phantom", "generate the phantom dataset in the VQA-RAD, SLAKE and PMC-VQA formats"),
    "data": ("data", "dataset statistics and majority baselines"),
    "pretrain": ("pretrain", "CLIP-pretrain an image encoder on image-caption pairs (+ optional masked-LM)"),
    "shards": ("shards", "write image-caption pairs as WebDataset tar shards for streaming pretraining"),
    "pretrain-eval": ("pretrain_eval", "retrieval and zero-shot scores of a CLIP model on a caption split"),
    "probe": ("probe", "linear probes of an encoder's frozen features on the phantom's ground truth"),
    "classify": ("classify", "image classification with any encoder: linear probe, fine-tuning or CLIP zero-shot "
                             "(MedMNIST, ImageFolder, datasets)"),
    "cache-features": ("cache_features", "encode a dataset's images once into the feature cache"),
    "train": ("train", "train a VQA head on a frozen (or fine-tuned) image encoder; writes a bundle"),
    "ensemble": ("ensemble", "several bundles of one recipe (different seeds) as one, calibrated on their "
                             "shared validation split"),
    "calibrate": ("calibrate", "fit a trained bundle's calibration again on its validation split (trust scores "
                               "for bundles trained before them)"),
    "eval": ("eval", "score a bundle on a benchmark split (published protocols); JSON, Markdown, plots"),
    "predict": ("predict", "answer questions about images with a bundle, as JSON (one or a JSONL batch)"),
    "demo": ("demo", "the Gradio demo in the browser (default: the shipped VQA-RAD model)"),
    "import": ("import_weights", "convert released weights (MEVF, OpenAI-format CLIP, PMC-CLIP, any encoder) "
                                 "to a safetensors folder"),
    "encoders": ("encoders", "list the encoders --encoder accepts: names, prefixes, input, grid, weights"),
    "push": ("push", "upload a bundle to the Hugging Face Hub with its model card (or into a local hub cache)"),
    "export": ("export", "export a bundle as ONNX graphs for onnxruntime (`medvqa export onnx`)"),
}

EPILOG = """examples:
  medvqa phantom runs/phantom --images 2000 --seed 0
  medvqa data stats runs/phantom/vqa-rad --format vqa-rad
  medvqa predict --bundle runs/demo/bundle --image scan.png --question "What imaging modality was used?"
  medvqa push runs/demo/bundle my-org/medvqa-demo
  medvqa demo --port 7860

run `medvqa COMMAND --help` for a command's options and an example.
set MEDVQA_TRACEBACK=1 to see tracebacks of input errors."""


def _usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name.ljust(width)}  {summary}" for name, (_, summary) in COMMANDS.items())
    return f"usage: medvqa COMMAND [options]\n\nmedical visual question answering\n\ncommands:\n{rows}\n\n{EPILOG}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"medvqa: error: unknown command {name!r}; expected one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=os.environ.get("MEDVQA_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    module = importlib.import_module(f"{__name__}.{COMMANDS[name][0]}")
    try:
        return int(module.main(rest) or 0)
    except (DataError, OSError, ValueError) as e:
        # Bad input is the user's to fix: one line naming what is wrong, no traceback. OSError: a path that is a
        # file where a folder is needed (--out README.md), no permission, a full disk: the system's words name it.
        if os.environ.get("MEDVQA_TRACEBACK", "0") not in ("", "0"):
            raise
        print(f"medvqa {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"medvqa {name}: interrupted", file=sys.stderr)
        return 130
