"""The one place for devices and mixed precision: autocast contexts and the fp16 GradScaler."""
from __future__ import annotations

import contextlib
import logging
from typing import ContextManager

import torch

from ..errors import DataError

log = logging.getLogger(__name__)
PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when present; 'cuda' without a GPU is an error, not a silent CPU run."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:  # torch's message lists every device type it knows; the user needs these
        raise DataError(f"--device {name}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"--device {name}: no CUDA GPU is available here (use --device cpu or auto)")
    return device


def check_precision(precision: str, device: torch.device) -> str:
    """Validate a precision for a device; fp16 on CPU has no fast kernels, so it is refused."""
    if precision not in PRECISIONS:
        raise DataError(f"--precision {precision!r} unknown; expected one of {PRECISIONS}")
    if precision == "fp16" and device.type != "cuda":
        raise DataError("--precision fp16 needs a CUDA GPU; on CPU use bf16 or fp32")
    return precision


def get_autocast(precision: str, device: torch.device) -> ContextManager:
    """An autocast context for the forward pass (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


def make_grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling against underflow; bf16 and fp32 do not."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None
