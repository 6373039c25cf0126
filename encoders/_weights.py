"""Read released weight files without running anything they contain.

    read_weights(path) -> {name: tensor}     # safetensors, a torch pickle, or a TorchScript archive

- `.safetensors`: read as is.
- torch pickles (`torch.save`, zip or legacy): `torch.load(weights_only=True)`, whose unpickler builds
  only tensors and plain containers. Numpy scalars and dtypes are allowed besides (PubMedCLIP's
  checkpoints store their best loss as a numpy float); any other global (`os.system`, a class of the
  training code) is a `DataError` naming it, and nothing in the file is run.
- TorchScript archives (OpenAI's own CLIP `.pt` files): `torch.jit.load` would compile and run the
  archive's code, so instead `data.pkl` is read with an unpickler that turns every scripted module
  into an inert attribute holder and rebuilds only tensors from the archive's storages; the tensors
  are named by their attribute paths, which are the `state_dict` names.
Checkpoints that nest the weights (`{"state_dict": ...}`, `model_state_dict`, `model`) are unwrapped
and a DataParallel/DDP `module.` prefix is dropped.
"""
from __future__ import annotations

import collections
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ._errors import DataError

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar", ".pkl")
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module")
# Globals allowed on top of torch's weights-only set: numpy scalars and dtypes only build data.
_NUMPY_GLOBALS = re.compile(r"^numpy(\._core|\.core)?(\.multiarray\.scalar|\.dtype|\.dtypes\.\w+DType)$")


def read_weights(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a weights file as a flat state dict (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise DataError(f"{path}: not a readable safetensors file ({e})") from None
    return flatten_state_dict(read_torch_file(path), path)


def read_torch_file(path: Path) -> Any:
    """`torch.load(weights_only=True)` (numpy scalars allowed), or the tensors of a TorchScript archive."""
    if zipfile.is_zipfile(path) and _is_torchscript(path):
        return read_torchscript_tensors(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        allowed: list[str] = []
        for _ in range(8):  # a legacy (non-zip) pickle names one refused global per try
            names = [n for n in _unsafe_globals(path, e) if n not in allowed]
            if not names or not all(_NUMPY_GLOBALS.match(n) for n in names):
                break
            allowed += names
            # each under the name the pickle asks for: numpy 2 answers numpy.core's names from numpy._core, and
            # torch would otherwise allow them only under the latter
            with torch.serialization.safe_globals([(_resolve(n), n) for n in allowed] + _numpy_dtype_classes()):
                try:
                    return torch.load(path, map_location="cpu", weights_only=True)
                except pickle.UnpicklingError as again:
                    e = again
        found = ", ".join(names) or str(e).splitlines()[0]
        raise DataError(f"{path}: refusing to unpickle {found}: medvqa reads only tensors and plain data from "
                        "pickles (torch.load weights_only=True); nothing in the file was run") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable torch file ({str(e).splitlines()[0] if str(e) else e!r})") from None


def flatten_state_dict(obj: Any, path: Path) -> dict[str, Tensor]:
    """Unwrap a checkpoint dict to its tensors: nested under state_dict/model_state_dict/model, `module.` dropped."""
    for _ in range(3):  # {"state_dict": {"model": ...}} happens
        if isinstance(obj, dict):
            nested = next((obj[k] for k in NESTED_KEYS if isinstance(obj.get(k), dict)), None)
            if nested is not None and not any(torch.is_tensor(v) for v in obj.values()):
                obj = nested
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a state dict (name -> tensor), found {type(obj).__name__}")
    tensors = {str(k): v for k, v in obj.items() if torch.is_tensor(v)}
    if not tensors:
        raise DataError(f"{path}: no tensors found (top-level keys: {sorted(map(str, obj))[:8]})")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def _unsafe_globals(path: Path, error: Exception) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # a legacy (non-zip) pickle: torch names the first refused global in its message
        return re.findall(r"GLOBAL ([\w.]+)", str(error))[:1]


def _numpy_dtype_classes() -> list[type]:
    """numpy >= 1.25 rebuilds a dtype through its class (numpy.dtypes.Float64DType, ...)."""
    import numpy as np

    dtypes = getattr(np, "dtypes", None)
    return [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")] if dtypes else []


def _resolve(name: str) -> Any:
    import importlib

    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


# -- TorchScript archives ---------------------------------------------------------------------------------------------

def _is_torchscript(path: Path) -> bool:
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())


_STORAGE_DTYPES = {"FloatStorage": torch.float32, "HalfStorage": torch.float16, "DoubleStorage": torch.float64,
                   "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                   "BoolStorage": torch.bool}


class _Scripted:
    """Stands for any scripted class (`__torch__.*`): keeps the attribute dict it is given, runs nothing."""

    def __setstate__(self, state: Any) -> None:
        self.__dict__["attributes"] = state if isinstance(state, dict) else {}


def _rebuild_tensor(storage: Tensor, offset: int, size, stride, *_ignored) -> Tensor:
    return torch.as_strided(storage, tuple(size), tuple(stride), offset)


def _rebuild_parameter(data: Tensor, *_ignored) -> Tensor:
    return data


class _ScriptUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, root: str, path: Path):
        super().__init__(file)
        self.archive, self.root, self.path = archive, root, path

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("__torch__"):
            return _Scripted
        allowed = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
                   ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
                   ("collections", "OrderedDict"): collections.OrderedDict,
                   ("torch.jit._pickle", "restore_type_tag"): lambda value, _tag: value,
                   ("torch.jit._pickle", "build_intlist"): list, ("torch.jit._pickle", "build_tensorlist"): list,
                   ("torch.jit._pickle", "build_doublelist"): list, ("torch.jit._pickle", "build_boollist"): list}
        if (module, name) in allowed:
            return allowed[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "builtins" and name in ("set", "frozenset", "tuple", "list", "dict"):
            return getattr(__import__("builtins"), name)
        raise DataError(f"{self.path}: TorchScript archive refers to '{module}.{name}', which medvqa does not "
                        "read (only tensors and module attributes are)")

    def persistent_load(self, pid: Any) -> Tensor:
        kind, dtype, key, _location, numel = pid
        if kind != "storage" or not isinstance(dtype, torch.dtype):
            raise DataError(f"{self.path}: unexpected TorchScript storage record {pid!r}")
        raw = bytearray(self.archive.read(f"{self.root}/data/{key}"))
        flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        return flat[:numel]


def read_torchscript_tensors(path: Path) -> dict[str, Tensor]:
    """The named tensors of a TorchScript archive (parameters, buffers and tensor attributes), safely."""
    with zipfile.ZipFile(path) as archive:
        data = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if not data:
            raise DataError(f"{path}: a zip file without data.pkl: neither torch.save nor TorchScript")
        root = data[0].split("/")[0]
        with archive.open(data[0]) as f:
            try:
                top = _ScriptUnpickler(f, archive, root, path).load()
            except DataError:
                raise
            except Exception as e:
                raise DataError(f"{path}: unreadable TorchScript data.pkl ({e.__class__.__name__}: {e})") from None
    tensors: dict[str, Tensor] = {}
    _collect(top, "", tensors, depth=0)
    return {k: v.clone() for k, v in tensors.items()}  # own the memory (the zip buffers are released)


def _collect(obj: Any, prefix: str, out: dict[str, Tensor], depth: int) -> None:
    if depth > 64:
        return
    if torch.is_tensor(obj):
        out[prefix.rstrip(".")] = obj
    elif isinstance(obj, _Scripted):
        for key, value in obj.__dict__.get("attributes", {}).items():
            _collect(value, f"{prefix}{key}.", out, depth + 1)
