"""Run-level plumbing: seeding, and the resolved config written next to a run's outputs."""
from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from .errors import DataError
from .io import atomic_write_json


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so a run repeats."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)


def parse_key_values(items: list[str], flag: str) -> dict:
    """['hidden_dim=512', 'k=3'] -> {'hidden_dim': 512, 'k': 3}; values are JSON when they parse as JSON."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DataError(f"{flag} {item!r}: expected KEY=VALUE, e.g. hidden_dim=512")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def write_run_config(config, out_dir: str | Path, name: str = "run_config.json") -> None:
    """The resolved config of a run (a dataclass), beside its outputs, as timm writes args.yaml."""
    data = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    atomic_write_json(Path(out_dir) / name, _jsonable(data))


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj
