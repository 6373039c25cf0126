"""Resumable training checkpoints: self-describing, written atomically, loaded without pickle code.

A checkpoint holds tensors, numbers and strings only, so `torch.load(weights_only=True)`
reads it; model weights for sharing go to a bundle (safetensors), not here.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import DataError

CHECKPOINT_NAME = "checkpoint.pt"


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """torch.save to a temp file beside `path`, then rename: a crash never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def resolve_resume(resume: str | None, out_dir: str | Path) -> Path | None:
    """`--resume latest` means OUT/checkpoint.pt if present (else a fresh start); a path must exist."""
    if not resume:
        return None
    if resume == "latest":
        path = Path(out_dir) / CHECKPOINT_NAME
        return path if path.is_file() else None
    path = Path(resume)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise DataError(f"--resume {resume}: no checkpoint at {path}")
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or foreign files raise many types
        raise DataError(f"{path}: not a readable medvqa checkpoint ({e})") from None


def check_compatible(saved: dict[str, Any], current: dict[str, Any], keys: tuple[str, ...], path: Path) -> None:
    """Resuming with another model or dataset would silently train something else: refuse."""
    for key in keys:
        if saved.get(key) != current.get(key):
            raise DataError(f"{path}: checkpoint was trained with {key}={saved.get(key)!r}, "
                            f"this run has {key}={current.get(key)!r}; use another --out or drop --resume")


def restore_optimization(state: dict[str, Any], optimizer, scheduler, scaler) -> None:
    """Optimizer, LR schedule, fp16 loss scale and the RNG, so the next step is the uninterrupted run's."""
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"])
