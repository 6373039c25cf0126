"""Run-level plumbing: seeding, and the resolved config written next to a run's outputs."""
from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..io import atomic_write_json


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so a run repeats."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)


def write_run_config(config: Any, out_dir: str | Path, name: str = "run_config.json") -> None:
    """The resolved config of a run (a dataclass), beside its outputs, as timm writes args.yaml."""
    data = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    atomic_write_json(Path(out_dir) / name, jsonable(data))


def jsonable(obj: Any) -> Any:
    """`obj` with paths as strings and tuples as lists, so it survives a JSON round trip unchanged."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj
