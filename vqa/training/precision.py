"""The one place for devices and mixed precision: autocast contexts, the fp16 GradScaler, and the record of the
kernels a run's numbers depend on."""
from __future__ import annotations

import contextlib
import logging
import os
import platform
from pathlib import Path
from typing import Any, ContextManager

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


def numerics(device: torch.device, precision: str) -> dict[str, Any]:
    """What a run's numbers depend on beyond its config and seed: torch, the device and, on a CPU, its model, the
    kernels oneDNN may pick and the intra-op threads. bf16 products differ bitwise between AMX and AVX512-BF16
    kernels, and a bf16 run of one seed gave other numbers on another CPU even with oneDNN capped to the first one's
    kernels (ONEDNN_MAX_CPU_ISA): the record names the CPU, not only its kernels. A CPU's reductions split over its
    threads, so one seed trained in fp32 on 1 and on 2 threads of one CPU gave two runs (docs/results.md)."""
    record: dict[str, Any] = {"precision": precision, "torch": torch.__version__, "device": device.type}
    if device.type == "cuda":
        return record | {"device_name": torch.cuda.get_device_name(device), "cuda": torch.version.cuda}
    def supports(probe: str) -> bool | None:  # torch's own CPU probes, private: None where this torch lacks one
        return getattr(torch.cpu, probe)() if hasattr(torch.cpu, probe) else None
    return record | {"device_name": cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                     "avx512_bf16": supports("_is_avx512_bf16_supported"), "amx": supports("_is_amx_tile_supported"),
                     "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA"),
                     "threads": torch.get_num_threads()}


def cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what the platform reports."""
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
