"""What runs the network behind a `Predictor`: PyTorch, or onnxruntime on an ONNX export.

A runtime does these things, and only these differ between runtimes:

    table = runtime.encode(images, batch_size)    # 8-bit PIL images -> {"grid": (I, N, D), "pooled": (I, D)} float16
    out = runtime.head(features, tokens, lengths)  # -> {"logits", "attention"[, "type_logits"]}, via vqa.inference
    pooled = runtime.encode_for_detector(images, batch_size)  # (I, D') float16 in the out-of-scope detector's own
                                                               # space, where it has one (vqa.ood)

Everything around them is shared: reading and checking inputs, tokenisation (`vqa.batches`),
the batching and decoding of `vqa.inference.predict`, calibration and abstention
(`vqa.calibration`), and turning scores into `Prediction`s (`vqa.predictor`).
"""
from __future__ import annotations

from typing import Protocol, Sequence

import torch
from PIL import Image

from .errors import DataError
from .features import encode_features
from .inference import HeadRunner
from .model import VQAModel

RUNTIMES = ("torch", "onnx")


class ModelRuntime(Protocol):
    """The network of a bundle, as the Predictor runs it."""

    kind: str  # "torch" | "onnx"
    device: torch.device
    encoder_name: str
    head_name: str
    grid_size: tuple[int, int]
    has_type_router: bool  # the head routes questions to a closed or an open branch (QCR)
    needs_choices: bool  # the head picks among given choices (PMC-VQA)
    default_loss: str  # the head's own loss, for bundles that do not record theirs
    has_fused_output: bool  # the head gives its fused vectors (what trust scores read)
    detector_encoder: object | None  # the out-of-scope detector's own encoder, where it has one

    def encode(self, images: Sequence[Image.Image], batch_size: int) -> dict[str, torch.Tensor]:
        """Features of 8-bit images as the feature cache stores them: float16 on the CPU."""
        ...

    def encode_for_detector(self, images: Sequence[Image.Image], batch_size: int) -> torch.Tensor:
        """Pooled features of 8-bit images through the out-of-scope detector's own encoder (float16, CPU)."""
        ...

    @property
    def head(self) -> HeadRunner:
        """What `vqa.inference.predict` runs on those features and the question tensors."""
        ...


class TorchRuntime:
    """A bundle's `VQAModel` in eval mode on `device` (and the out-of-scope detector's own encoder, if any)."""

    kind = "torch"

    def __init__(self, model: VQAModel, device: torch.device, detector_encoder: torch.nn.Module | None = None) -> None:
        self.device = device
        self.model = model.to(device).eval()
        self.detector_encoder = None if detector_encoder is None else detector_encoder.to(device).eval()
        encoder, head = model.encoder, model.head
        self.encoder_name, self.head_name, self.grid_size = encoder.name, head.name, tuple(encoder.grid_size)
        self.has_type_router, self.needs_choices = head.has_type_router, head.needs_choices
        self.default_loss, self.has_fused_output = head.default_loss, head.has_fused_output

    def encode(self, images: Sequence[Image.Image], batch_size: int) -> dict[str, torch.Tensor]:
        return encode_features(self.model.encoder, images, batch_size, self.device)

    def encode_for_detector(self, images: Sequence[Image.Image], batch_size: int) -> torch.Tensor:
        if self.detector_encoder is None:
            raise DataError("this runtime was built without the out-of-scope detector's encoder")
        return encode_features(self.detector_encoder, images, batch_size, self.device)["pooled"]

    @property
    def head(self) -> VQAModel:
        return self.model
