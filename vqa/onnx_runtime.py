"""Run an ONNX export (`vqa.onnx_export`) in onnxruntime, on the CPU: the `Predictor`'s "onnx" runtime.

    predictor = Predictor.from_onnx("runs/qcr/bundle/onnx")
    predictor = Predictor.from_pretrained("runs/qcr/bundle", runtime="onnx")   # the bundle's onnx/ subfolder

Only the graphs run here (the encoder, the head, and the out-of-scope detector's own encoder
where it has one); pixels are prepared by `encoders.pixels.preprocess` from the export's
description of each encoder, and the features are rounded to float16 as the
PyTorch runtime gives them (`ImageEncoder.encode`), so both runtimes feed the head the same
numbers and share every step before and after (`vqa.runtimes`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from .errors import DataError


@dataclass(frozen=True)
class PixelSpec:
    """The encoder's preprocessing, as `encoders.pixels.preprocess` reads it from an encoder."""

    image_size: int
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, spec: Mapping[str, Any]) -> "PixelSpec":
        """From an encoder graph's description in the export's config.json."""
        return cls(int(spec["image_size"]), int(spec["in_chans"]), tuple(spec["mean"]), tuple(spec["std"]))


def session(path: str | Path, threads: int | None = None):
    """An onnxruntime session on the CPU provider; `threads` intra-op threads (None: onnxruntime's default)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise DataError("the onnx runtime needs onnxruntime: pip install 'medvqa[onnx]'") from None
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: its warnings about unused initialisers are noise here
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own unexported exception types
        raise DataError(f"{path}: onnxruntime cannot load it ({str(e).splitlines()[0]})") from None


def onnx_folder(path: str | Path) -> Path:
    """The ONNX export of a folder: the folder itself, or its `onnx/` subfolder (a bundle exported into itself)."""
    from .onnx_export import HEAD_FILE

    path = Path(path)
    for folder in (path, path / "onnx"):
        if (folder / HEAD_FILE).is_file():
            return folder
    raise DataError(f"{path}: no ONNX export here (no {HEAD_FILE}, nor onnx/{HEAD_FILE}); "
                    f"write one with `medvqa export onnx {path}`")


class OnnxHead:
    """The head graph behind `vqa.inference.predict`'s call: features + question tensors -> output dict."""

    def __init__(self, graph, outputs: Sequence[str]) -> None:
        self.graph, self.outputs = graph, list(outputs)
        self.inputs = {i.name for i in graph.get_inputs()}  # the exporter drops inputs the graph never reads

    def eval(self) -> "OnnxHead":
        return self

    def __call__(self, features: Mapping[str, torch.Tensor], tokens: torch.Tensor, lengths: torch.Tensor,
                 **choices: torch.Tensor) -> dict[str, torch.Tensor]:
        given = {**features, "tokens": tokens, "lengths": lengths, **choices}
        feed = {name: _numpy(value) for name, value in given.items() if name in self.inputs}
        return {name: torch.from_numpy(value) for name, value in zip(self.outputs, self.graph.run(self.outputs, feed))}


class OnnxRuntime:
    """An ONNX export's encoder and head graphs in onnxruntime (see `vqa.runtimes.ModelRuntime`)."""

    kind = "onnx"

    def __init__(self, folder: str | Path, config: dict[str, Any], threads: int | None = None) -> None:
        from .onnx_export import FORMAT

        folder = Path(folder)
        spec = config.get("onnx")
        if not isinstance(spec, dict) or spec.get("format") != FORMAT:
            raise DataError(f"{folder / 'config.json'}: not an ONNX export (write one with `medvqa export onnx`)")
        try:
            enc, head, ood = spec["encoder"], spec["head"], spec.get("ood_encoder")
            self.pixels = PixelSpec.of(enc)
            self.detector_pixels = None if ood is None else PixelSpec.of(ood)
            self.encoder_name, self.head_name = str(enc["name"]), str(head["name"])
            self.grid_size = tuple(int(x) for x in enc["grid_size"])
            self.has_type_router, self.needs_choices = bool(head["has_type_router"]), bool(head["needs_choices"])
            self.default_loss, outputs = str(head["default_loss"]), list(head["outputs"])
            self.has_fused_output = "fused" in outputs
            encoder_file, head_file = enc["file"], head["file"]
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{folder / 'config.json'}: incomplete ONNX description "
                            f"({type(e).__name__}: {e})") from None
        self.device = torch.device("cpu")
        self.encoder = session(folder / encoder_file, threads)
        self._head = OnnxHead(session(folder / head_file, threads), outputs)
        self.detector_encoder = None if ood is None else session(folder / str(ood.get("file")), threads)

    def encode(self, images: Sequence[Image.Image], batch_size: int) -> dict[str, torch.Tensor]:
        return _run_encoder(self.encoder, self.pixels, ("grid", "pooled"), images, batch_size)

    def encode_for_detector(self, images: Sequence[Image.Image], batch_size: int) -> torch.Tensor:
        if self.detector_encoder is None:
            raise DataError("this ONNX export has no graph of the out-of-scope detector's encoder: export the "
                            "bundle again with this version of medvqa")
        return _run_encoder(self.detector_encoder, self.detector_pixels, ("pooled",), images, batch_size)["pooled"]

    @property
    def head(self) -> OnnxHead:
        return self._head


def _run_encoder(graph, pixels: PixelSpec, outputs: Sequence[str], images: Sequence[Image.Image],
                 batch_size: int) -> dict[str, torch.Tensor]:
    """An encoder graph's `outputs` for 8-bit images, in float16, as ImageEncoder.encode and the feature cache give
    them."""
    from encoders.pixels import preprocess

    parts = []
    for start in range(0, len(images), batch_size):
        feed = {"pixels": preprocess(images[start:start + batch_size], pixels).numpy()}  # (B, C, S, S)
        parts.append(dict(zip(outputs, (torch.from_numpy(a).to(torch.float16) for a in graph.run(list(outputs), feed)))))
    return {key: torch.cat([p[key] for p in parts]) for key in outputs}


def _numpy(value: torch.Tensor) -> np.ndarray:
    """float32 for features (the graphs' input type), int64 for token ids and lengths."""
    return value.detach().cpu().numpy().astype(np.float32 if value.is_floating_point() else np.int64, copy=False)
