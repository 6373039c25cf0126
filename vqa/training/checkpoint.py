"""Resumable training checkpoints: self-describing, written atomically, loaded without pickle code.

A checkpoint holds tensors, numbers and strings only, so `torch.load(weights_only=True)`
reads it; model weights for sharing go to a bundle (safetensors), not here.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError
from ..io import atomic_write

CHECKPOINT_NAME = "checkpoint.pt"


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """torch.save to a temp file beside `path`, then rename: a crash never leaves half a checkpoint."""
    with atomic_write(path, binary=True) as f:
        torch.save(state, f)
        # on disk before the rename replaces the last good one: after a power cut or a node's crash the
        # file system may otherwise keep the new name with none of its bytes, and the run could not resume
        f.flush()
        os.fsync(f.fileno())


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


def run_identity(settings: dict[str, Any], paths: tuple[str, ...]) -> dict[str, Any]:
    """What a checkpoint records of its run: the settings, those of `paths` that name an existing file or folder
    made absolute, so that resuming from another working directory finds them the same."""
    return {k: os.path.abspath(v) if k in paths and isinstance(v, str) and os.path.exists(v) else v
            for k, v in settings.items()}


def _same_setting(saved: Any, current: Any) -> bool:
    """Equal, or two spellings of one existing file or folder (relative and absolute, through a link): a run
    resumed from another working directory reads the same data."""
    if saved == current:
        return True
    if isinstance(saved, str) and isinstance(current, str):
        try:
            return os.path.samefile(saved, current)
        except (OSError, ValueError):
            return False
    return False


def check_compatible(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Resuming with another model, dataset or batch order would silently train something else: refuse."""
    for key in sorted(set(saved) | set(current)):
        if not _same_setting(saved.get(key), current.get(key)):
            raise DataError(f"{path}: checkpoint was trained with {key}={saved.get(key)!r}, "
                            f"this run has {key}={current.get(key)!r}; use another --out or drop --resume")


# The optimizer's rates and the schedule's position come back from the checkpoint, and the schedule's shape from
# these settings and its length: a run resumed with other values would train neither as asked nor as it began
# (nor with another clip on its gradients).
SCHEDULE_SETTINGS = ("lr", "weight_decay", "warmup_epochs", "lr_schedule", "clip_norm")
_UNRECORDED = {"lr_schedule": "cosine"}  # what checkpoints from before a setting existed trained with


def check_same_schedule(saved_config: dict[str, Any], current: Any, path: Path, task_settings: tuple[str, ...] = ()
                        ) -> None:
    """Refuse to resume a run whose training settings (`SCHEDULE_SETTINGS`, and the task's `task_settings`)
    or schedule length differ from its checkpoint's. The run's own epochs may differ where the schedule's length does not: a run that stopped partway
    down a longer schedule (`schedule_epochs`) continues down it, to a later epoch or to its end."""
    keys = [k for k in SCHEDULE_SETTINGS + task_settings if k in saved_config or k in _UNRECORDED]
    check_compatible({k: saved_config.get(k, _UNRECORDED.get(k)) for k in keys},
                     {k: getattr(current, k) for k in keys}, path)
    if "epochs" in saved_config:
        saved = saved_config.get("schedule_epochs") or saved_config["epochs"]  # a recorded config's schedule_length
        if saved != current.schedule_length:
            raise DataError(f"{path}: checkpoint's learning-rate schedule runs {saved} epochs (its --epochs, or "
                            f"--schedule-epochs where longer), this run's {current.schedule_length}; use another --out "
                            "or drop --resume")


def rng_state() -> dict[str, Any]:
    """Every random generator a training step may draw from: Python, NumPy, torch CPU and CUDA."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {"torch": torch.get_rng_state(),
                             "numpy": torch.from_numpy(keys.astype(np.int64)),
                             "numpy_extra": [int(pos), int(has_gauss), float(gauss)],
                             "python": repr(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
        if torch.distributed.is_available() and torch.distributed.is_initialized():  # a rank's own (set_device)
            state["cuda_device"] = torch.cuda.current_device()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `rng_state` (the CUDA part only where this process has the same GPUs)."""
    import ast

    torch.set_rng_state(state["torch"])
    pos, has_gauss, gauss = state["numpy_extra"]
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss = ast.literal_eval(state["python"])
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        cuda = list(state["cuda"])
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        if "cuda_device" in state and int(state["cuda_device"]) < len(cuda):
            # Only rank 0 saves, and only its own device's generator has moved: every rank, seeded alike and drawing
            # alike, continues from that one on its own device (the rest of the list is the untouched seed state)
            torch.cuda.set_rng_state(cuda[int(state["cuda_device"])], torch.cuda.current_device())
