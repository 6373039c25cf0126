"""Read MEVF's released image weights safely and map them onto `MEVFEncoder`.

MEVF ships (for VQA-RAD):
- `pretrained_maml.weights`: a pickled dict of numpy arrays, TensorFlow layout:
  conv1..conv4 (3, 3, in, out) and b1..b4 (out,). No BatchNorm parameters: MEVF
  creates its BatchNorms fresh (weight 1, bias 0, mean 0, var 1).
- `pretrained_ae.pth`: a plain torch state dict of the autoencoder.
- MEVF's `convert` (Linear 16384 -> 64 over the autoencoder code) is not released:
  MEVF trains it with the VQA head from PyTorch's default initialisation, which
  we reproduce from a fixed seed so that the conversion is deterministic.
A trained MEVF model file (`model_state` with maml_v_emb.*, ae_v_emb.*, convert.*)
can be given as `checkpoint` to take every image-side tensor from it instead.

Pickles can run code when loaded; `safe_unpickle` only builds builtin containers,
OrderedDict and numpy arrays (with `builtins_only`, builtin containers and scalars alone: PathVQA's
question files), and refuses every other global by name.
"""
from __future__ import annotations

import builtins
import collections
import contextlib
import importlib
import logging
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

MAML_FILE = "pretrained_maml.weights"
AE_FILE = "pretrained_ae.pth"

# Builtins that only build plain data; never eval/exec/getattr/__import__ and friends.
_SAFE_BUILTINS = {"dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "bool", "str",
                  "bytes", "bytearray", "slice", "range"}
_NUMPY_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
}

# MEVF's autoencoder layer names -> ours (ConvAutoencoder).
AE_NAMES = {"conv1": "enc1", "conv2": "enc2", "conv3": "enc3", "tran_conv1": "dec1",
            "conv4": "dec2", "tran_conv2": "dec3", "conv5": "dec4"}


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for a global outside the allow-list."""


def safe_builtin(module: str, name: str) -> Any:
    """The builtin a pickle names when it only builds plain data, else None. Protocol 0-2 pickles written
    by Python 2 name the module `__builtin__`; an overridden find_class sees that name unmapped."""
    if module in ("builtins", "__builtin__") and name in _SAFE_BUILTINS:
        return getattr(builtins, name)
    return None


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path, builtins_only: bool = False):
        super().__init__(file)
        self.path, self.builtins_only = path, builtins_only

    def find_class(self, module: str, name: str) -> Any:
        builtin = safe_builtin(module, name)
        if builtin is not None:
            return builtin
        if self.builtins_only:
            raise UnsafePickleError(f"{self.path}: refusing to unpickle global '{module}.{name}' "
                                    "(only builtin containers and scalars are allowed in this file)")
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) in _NUMPY_GLOBALS:
            if module == "numpy":
                return getattr(np, name)
            return getattr(_numpy_multiarray(), name)
        raise UnsafePickleError(f"{self.path}: refusing to unpickle global '{module}.{name}' "
                                "(only builtin containers, collections.OrderedDict and numpy arrays are allowed)")


def _numpy_multiarray():
    """numpy 2 moved numpy.core to numpy._core; old pickles name numpy.core."""
    try:
        return importlib.import_module("numpy._core.multiarray")
    except ImportError:  # numpy 1.x
        return importlib.import_module("numpy.core.multiarray")


def safe_unpickle(path: str | os.PathLike, builtins_only: bool = False, stream=None) -> Any:
    """Unpickle `path` allowing only plain data and numpy arrays (`builtins_only`: plain data alone); with
    `stream` (an open binary file of `path`), the next pickle in it.

    Raises UnsafePickleError naming the file and the refused global, and
    ValueError naming the file when it is not a valid pickle."""
    path = Path(path)
    with open(path, "rb") if stream is None else contextlib.nullcontext(stream) as f:
        try:
            return _RestrictedUnpickler(f, path, builtins_only).load()
        except UnsafePickleError:
            raise
        except Exception as e:  # truncated or not a pickle at all
            raise ValueError(f"{path}: not a readable pickle ({e.__class__.__name__}: {e})") from e


def convert_mevf_weights(mevf_dir: str | os.PathLike, checkpoint: str | os.PathLike | None = None,
                         seed: int = 0) -> dict[str, Tensor]:
    """MEVF's released files -> a state dict for `create_encoder("mevf")` (load with strict=True)."""
    mevf_dir = Path(mevf_dir)
    state: dict[str, Tensor] = {}
    state.update(_maml_state(mevf_dir / MAML_FILE))
    state.update(_ae_state(mevf_dir / AE_FILE))
    state.update(_fresh_projection(seed))
    if checkpoint is not None:
        state.update(_checkpoint_state(Path(checkpoint)))
    return state


def _maml_state(path: Path) -> dict[str, Tensor]:
    weights = safe_unpickle(path)
    if not isinstance(weights, dict):
        raise ValueError(f"{path}: expected a dict of arrays, got {type(weights).__name__}")
    state: dict[str, Tensor] = {}
    for i in range(4):
        kernel_key, bias_key = f"conv{i + 1}", f"b{i + 1}"
        missing = [k for k in (kernel_key, bias_key) if k not in weights]
        if missing:
            raise ValueError(f"{path}: missing {missing}; found {sorted(weights)}")
        kernel = np.asarray(weights[kernel_key], dtype=np.float32)
        if kernel.ndim != 4 or kernel.shape[:2] != (3, 3):
            raise ValueError(f"{path}: {kernel_key} has shape {kernel.shape}, expected (3, 3, in, out)")
        prefix = f"maml.layers.{i}"
        # TensorFlow (kh, kw, in, out) -> PyTorch (out, in, kh, kw)
        state[f"{prefix}.conv.weight"] = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy())
        state[f"{prefix}.conv.bias"] = torch.from_numpy(np.asarray(weights[bias_key], dtype=np.float32).copy())
        state.update(_fresh_batchnorm(f"{prefix}.norm", kernel.shape[3]))
    return state


def _fresh_batchnorm(prefix: str, width: int) -> dict[str, Tensor]:
    return {f"{prefix}.weight": torch.ones(width), f"{prefix}.bias": torch.zeros(width),
            f"{prefix}.running_mean": torch.zeros(width), f"{prefix}.running_var": torch.ones(width),
            f"{prefix}.num_batches_tracked": torch.tensor(0, dtype=torch.long)}


def _ae_state(path: Path) -> dict[str, Tensor]:
    try:
        released = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable torch state dict ({e})") from e
    return _rename(released, {f"{old}.": f"autoencoder.{new}." for old, new in AE_NAMES.items()}, path,
                   expected=len(AE_NAMES) * 2)


def _fresh_projection(seed: int, code_size: int = 16384, dim: int = 64) -> dict[str, Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layer = nn.Linear(code_size, dim)  # PyTorch's default init, as MEVF's untrained `convert`
    return {"ae_proj.weight": layer.weight.detach(), "ae_proj.bias": layer.bias.detach()}


def _checkpoint_state(path: Path) -> dict[str, Tensor]:
    """A trained MEVF model (utils.save_model: {"model_state": ..., "epoch": ...})."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types (pickle, zip, unpickler refusals); the path says which file
        raise ValueError(f"{path}: not a readable torch checkpoint ({e})") from e
    model_state = data.get("model_state", data) if isinstance(data, dict) else None
    if not isinstance(model_state, dict):
        raise ValueError(f"{path}: expected a MEVF model state dict")
    prefixes = {"convert.": "ae_proj."}
    prefixes.update({f"ae_v_emb.{old}.": f"autoencoder.{new}." for old, new in AE_NAMES.items()})
    for i in range(4):
        prefixes[f"maml_v_emb.conv{i + 1}_bn."] = f"maml.layers.{i}.norm."
        prefixes[f"maml_v_emb.conv{i + 1}."] = f"maml.layers.{i}.conv."
    image_side = {k: v for k, v in model_state.items() if k.startswith(("maml_v_emb.", "ae_v_emb.", "convert."))}
    if not image_side:
        raise ValueError(f"{path}: no MEVF image weights (maml_v_emb.*, ae_v_emb.*, convert.*) found")
    return _rename(image_side, prefixes, path)


def _rename(state: dict[str, Tensor], prefixes: dict[str, str], path: Path,
            expected: int | None = None) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    # longest prefix first, so "conv1_bn." wins over "conv1."
    ordered = sorted(prefixes.items(), key=lambda kv: -len(kv[0]))
    for key, value in state.items():
        match = next(((old, new) for old, new in ordered if key.startswith(old)), None)
        if match is None:
            raise ValueError(f"{path}: unexpected tensor {key!r}")
        out[match[1] + key[len(match[0]):]] = value.detach().float() if value.is_floating_point() else value
    if expected is not None and len(out) != expected:
        raise ValueError(f"{path}: expected {expected} tensors, found {len(out)} ({sorted(state)})")
    return out
