"""The tensors of a module pickled whole in torch.save's legacy format (torch < 1.6), read without running it.

MEVF and QCR release their question side's word embedding (`embed_tfidf_weights.pkl`: BAN's `WordEmbedding`,
GloVe beside a tf-idf-weighted GloVe, 2 x 300-d) as a whole `nn.Module` saved by torch 0.4. `torch.load` with
`weights_only=True` refuses it (it names the module's class), and without it would import and run whatever the
pickle names. Here every `nn.Module` class it names becomes an inert stand-in that keeps its attributes, tensors
are rebuilt from the raw storages that follow the pickle, and any other global is refused by name.

The legacy layout: four pickles (magic number, protocol version, system info, the object with persistent ids for
its storages), a pickle of the storage keys in file order, then per key an int64 element count and the raw
little-endian elements.
"""
from __future__ import annotations

import collections
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .mevf_weights import UnsafePickleError, safe_builtin, safe_unpickle

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {"FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
                   "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                   "BoolStorage": torch.bool}


class _Module:
    """Stands in for any pickled nn.Module class: keeps the attributes it is given, runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)


@dataclass
class _Storage:
    dtype: torch.dtype
    numel: int
    data: torch.Tensor | None = None


@dataclass
class _TensorRef:
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def tensor(self) -> torch.Tensor:
        return torch.as_strided(self.storage.data, self.size, self.stride, self.offset).clone()


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None) -> _TensorRef:
    return _TensorRef(storage, int(offset), tuple(size), tuple(stride))


def _rebuild_parameter(data: _TensorRef, requires_grad: bool, hooks=None, state=None) -> _TensorRef:
    return data  # a parameter's tensor, as a state dict holds it


def _no_backend() -> None:  # torch 0.4 pickled each module's THNN backend as a call to this
    return None


class _LegacyUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path, classes: frozenset[tuple[str, str]]) -> None:
        super().__init__(file)
        self.path, self.classes = path, classes
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        builtin = safe_builtin(module, name)
        if builtin is not None:
            return builtin
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) == ("torch.nn.backends.thnn", "_get_thnn_function_backend"):
            return _no_backend
        if (module.startswith("torch.nn.modules.") and name[:1].isupper()) or (module, name) in self.classes:
            return type(name, (_Module,), {})
        raise UnsafePickleError(f"{self.path}: refusing to unpickle global '{module}.{name}' (only torch's "
                                "nn.Module classes, the classes named by the caller and tensors are allowed)")

    def persistent_load(self, pid: Any) -> Any:
        kind = pid[0] if isinstance(pid, tuple) and pid else None
        if kind == "module":  # ("module", class, source file, source): the class, already a stand-in
            return pid[1]
        if kind == "storage":  # ("storage", dtype, key, location, numel, view)
            dtype, key, _, numel, view = pid[1:6]
            if view is not None:
                raise ValueError(f"{self.path}: storage views are not supported")
            return self.storages.setdefault(str(key), _Storage(dtype, int(numel)))
        raise ValueError(f"{self.path}: unexpected persistent id {str(pid)[:80]!r}")


def read_legacy_module(path: str | os.PathLike, classes: tuple[tuple[str, str], ...] = ()) -> dict[str, torch.Tensor]:
    """The parameters and buffers of a module (or the tensors of a dict) saved by legacy torch.save, by dotted name.

    `classes`: (module, name) of the saver's own nn.Module subclasses the pickle may name (MEVF's
    ("language_model", "WordEmbedding")). Raises UnsafePickleError naming any other global, ValueError naming
    the file where its layout is not the legacy one."""
    path = Path(path)
    with open(path, "rb") as f:
        try:
            if _next_plain_pickle(f, path) != LEGACY_MAGIC:
                raise ValueError("not a legacy torch.save file (the zip format loads with torch.load)")
            _next_plain_pickle(f, path), _next_plain_pickle(f, path)  # protocol version, system info
            unpickler = _LegacyUnpickler(f, path, frozenset(classes))
            root = unpickler.load()
            keys = _next_plain_pickle(f, path)
            for key in keys:
                storage = unpickler.storages[str(key)]
                count = int.from_bytes(f.read(8), "little", signed=True)
                width = storage.dtype.itemsize
                raw = f.read(count * width)
                if count != storage.numel or len(raw) != count * width:
                    raise ValueError(f"storage {key}: {len(raw)} bytes for {storage.numel} elements")
                storage.data = torch.frombuffer(bytearray(raw), dtype=storage.dtype)
            missing = sorted(key for key, storage in unpickler.storages.items() if storage.data is None)
            if missing:
                raise ValueError(f"no data for storages {missing[:5]}")
            return _tensors(root, "")
        except UnsafePickleError:
            raise
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, RuntimeError) as e:
            raise ValueError(f"{path}: not a readable legacy torch file ({e.__class__.__name__}: {e})") from e


def _next_plain_pickle(f, path: Path) -> Any:
    """The next plain-data pickle of an open file (the legacy format's headers and key list)."""
    return safe_unpickle(path, builtins_only=True, stream=f)


def _tensors(obj: Any, prefix: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, _TensorRef):
        return {prefix.rstrip("."): obj.tensor()}
    if isinstance(obj, dict):
        return {k: v for name, value in obj.items() for k, v in _tensors(value, f"{prefix}{name}.").items()}
    if isinstance(obj, _Module):
        found: dict[str, torch.Tensor] = {}
        for group in ("_parameters", "_buffers", "_modules"):
            found.update(_tensors({k: v for k, v in (obj.__dict__.get(group) or {}).items() if v is not None},
                                  prefix))
        return found
    return {}
