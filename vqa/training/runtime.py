"""Run-level plumbing: seeding, the allocator, and the resolved config written next to a run's outputs."""
from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..io import atomic_write_json, shared_path

log = logging.getLogger(__name__)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
HEAP_REUSE_BYTES = 1 << 30  # blocks up to this size come from (and go back to) the heap; mallopt takes an int


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so a run repeats."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)


def keep_freed_memory() -> bool:
    """Let glibc keep freed blocks up to 1 GiB for reuse instead of unmapping them; False where it cannot.

    A training step frees activations of tens of MB that the next step allocates again. glibc serves such
    blocks with mmap and returns them on free, so each step page-faults every page in afresh: measured on 2
    cores, half of a CPU fine-tuning run's time went to the kernel (benchmarks/heap_reuse.py). The memory
    stays with the process, as PyTorch's own CUDA caching allocator keeps GPU memory. Not the engine's
    default: on the test suite's tiny models it made training 25-45% slower (measured, not yet explained), so a
    caller whose steps allocate large activations turns it on (benchmarks/real_vqa_rad.py does).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): their allocators behave otherwise
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, HEAP_REUSE_BYTES) == 1
    ok = libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1 and ok  # return the heap's free top only beyond 2 GiB
    if not ok:
        log.debug("mallopt refused the heap thresholds; freed blocks go back to the system")
    return ok


def write_run_config(config: Any, out_dir: str | Path, name: str = "run_config.json") -> None:
    """The resolved config of a run (a dataclass), beside its outputs, as timm writes args.yaml."""
    data = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    atomic_write_json(Path(out_dir) / name, jsonable(data))




def shareable_config(config: Any) -> dict:
    """The run config as a bundle shares it: the invocation's fields left out, and each of `PATH_FIELDS` that names
    a file or folder of this machine reduced to "local:NAME" (a shared file names no one's folders), which a rerun
    from it (`--config`) must give again; the feature cache's folder reset to the default."""
    data = jsonable(dataclasses.asdict(config))
    for name in getattr(config, "INVOCATION_FIELDS", ()):
        data.pop(name, None)
    for name in getattr(config, "PATH_FIELDS", ()):
        if name in data:
            data[name] = shared_path(data[name])
    for name, value in data.items():  # --encoder-arg pretrained=FILE and the like
        if isinstance(value, dict):
            data[name] = {k: shared_path(v) for k, v in value.items()}
    if "cache_dir" in data:
        data["cache_dir"] = None
    return data


def jsonable(obj: Any) -> Any:
    """`obj` with paths as strings and tuples as lists, so it survives a JSON round trip unchanged."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj
