"""Image classification data (`medvqa classify`): MedMNIST's released .npz files, an ImageFolder tree, `datasets`.

    data = load_classification("medmnist", "path/to/medmnist", "test", flag="chestmnist", size=64)
    data.images        # one per image: uint8 arrays (MedMNIST) or file paths (ImageFolder)
    data.labels        # (N,) class ids, or (N, L) 0/1 for a multi-label set (ChestMNIST)
    data.label_names, data.task   # task as MedMNIST's INFO names it

MedMNIST (v2/v3, the 2D sets): `{flag}.npz` (28 px) or `{flag}_{64,128,224}.npz` holding
`{train,val,test}_images` (N, H, W) or (N, H, W, 3) uint8 and `{train,val,test}_labels` (N, 1) class
ids or (N, L) 0/1 (ChestMNIST's 14 findings). The files carry no label names: they come from
`--labels FILE` (one entry of MedMNIST's INFO, as JSON), else `{flag}.json` beside the npz (what the
phantom writes), else the `medmnist` package's `INFO` when it is installed, else the class ids
(with a warning: zero-shot prompts need names). Files are read with `allow_pickle=False`.

ImageFolder: `ROOT/{train,val,test}/{class}/*.{jpg,png,...}` (`val` may be `validate` or `validation`);
the classes are the sorted class folders of all splits, so ids agree across splits.
"""
from __future__ import annotations

import inspect
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import DataError

log = logging.getLogger(__name__)

MULTI_CLASS, BINARY, MULTI_LABEL, ORDINAL = "multi-class", "binary-class", "multi-label, binary-class", \
    "ordinal-regression"
TASKS = (MULTI_CLASS, BINARY, MULTI_LABEL, ORDINAL)
SPLIT_ALIASES = {"train": "train", "val": "val", "validate": "val", "validation": "val", "test": "test"}
MEDMNIST_SIZES = (28, 64, 128, 224)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".dcm"}


@dataclass(frozen=True)
class ClassificationSet:
    """One split of a classification dataset."""

    images: Sequence[Any]  # paths, PIL images or uint8 arrays: whatever encoders.load_image reads
    labels: np.ndarray  # (N,) int64 class ids, or (N, L) int64 0/1 for multi-label
    label_names: tuple[str, ...]
    task: str  # one of TASKS
    split: str
    name: str  # the dataset's name (MedMNIST flag, folder name, hub id): picks its zero-shot prompts
    source: str  # the file or folder it was read from

    def __len__(self) -> int:
        return len(self.images)

    @property
    def multi_label(self) -> bool:
        return self.task == MULTI_LABEL


def canonical_split(split: str) -> str:
    if split not in SPLIT_ALIASES:
        raise DataError(f"split {split!r} unknown; expected train, val (or validate/validation) or test")
    return SPLIT_ALIASES[split]


# -- MedMNIST --------------------------------------------------------------------------------------------------
def medmnist_file(root: str | Path, flag: str | None = None, size: int | None = None) -> Path:
    """The .npz to read: `root` itself, or `{flag}[_{size}].npz` in the folder `root`."""
    root = Path(root)
    if root.is_file():
        return root
    if not root.is_dir():
        raise DataError(f"{root}: MedMNIST file or folder not found")
    found: dict[str, dict[int, Path]] = {}
    for path in sorted(root.glob("*.npz")):
        stem, _, tail = path.stem.rpartition("_")
        if stem and tail.isdigit():
            found.setdefault(stem, {})[int(tail)] = path
        else:
            found.setdefault(path.stem, {})[28] = path
    if not found:
        raise DataError(f"{root}: no MedMNIST .npz files (expected e.g. pathmnist.npz or pathmnist_64.npz)")
    if flag is None:
        if len(found) > 1:
            raise DataError(f"{root}: several MedMNIST sets ({', '.join(sorted(found))}); pass --flag NAME")
        flag = next(iter(found))
    if flag not in found:
        raise DataError(f"{root}: no {flag}.npz or {flag}_SIZE.npz (found {', '.join(sorted(found))})")
    sizes = found[flag]
    if size is None:
        if len(sizes) > 1:
            raise DataError(f"{root}: {flag} at several sizes ({sorted(sizes)}); pass --size")
        size = next(iter(sizes))
    if size not in sizes:
        raise DataError(f"{root}: no {flag} file at {size} px (found {sorted(sizes)} px)")
    return sizes[size]


def _flag_of(path: Path) -> str:
    stem, _, tail = path.stem.rpartition("_")
    return stem if stem and tail.isdigit() else path.stem


def medmnist_info(flag: str, npz: Path, labels_file: str | Path | None = None) -> dict | None:
    """MedMNIST's INFO entry for `flag` (its "task" and "label" names): from `labels_file`, a `{flag}.json`
    beside the npz, or the `medmnist` package; None when none of them has it."""
    from ..io import read_json

    sidecar = npz.parent / f"{flag}.json"
    path = Path(labels_file) if labels_file else (sidecar if sidecar.is_file() else None)
    if path is not None:  # a --labels file that is missing is an error (read_json names it)
        info = read_json(path)
        if isinstance(info, dict) and "label" not in info and isinstance(info.get(flag), dict):
            info = info[flag]  # the whole INFO dict, {flag: entry}
        if not isinstance(info, dict) or not isinstance(info.get("label"), dict):
            raise DataError(f"{path}: expected a MedMNIST INFO entry: {{\"task\": ..., \"label\": "
                            "{\"0\": name, ...}}")
        return info
    try:
        from medmnist import INFO  # optional: the package is not needed to read the files
    except ImportError:
        return None
    return INFO.get(flag)


def _label_names_and_task(flag: str, npz: Path, labels: np.ndarray, labels_file) -> tuple[tuple[str, ...], str]:
    info = medmnist_info(flag, npz, labels_file)
    if info is not None:
        names = info["label"]
        try:
            ordered = tuple(str(names[str(i)]) for i in range(len(names)))
        except KeyError:
            raise DataError(f"{npz}: the label names of {flag} must be keyed '0'..'{len(names) - 1}', "
                            f"got {sorted(names)}") from None
        task = str(info.get("task", ""))
        if task not in TASKS:
            raise DataError(f"{npz}: task {task!r} of {flag} unknown; expected one of {list(TASKS)}")
        return ordered, task
    width = labels.shape[1] if labels.ndim == 2 and labels.shape[1] > 1 else int(labels.max(initial=0)) + 1
    log.warning("%s: no label names for %r (pass --labels FILE with its MedMNIST INFO entry, put %s.json "
                "beside it, or install medmnist): classes are named by their ids", npz, flag, flag)
    task = MULTI_LABEL if labels.ndim == 2 and labels.shape[1] > 1 else (BINARY if width == 2 else MULTI_CLASS)
    return tuple(str(i) for i in range(width)), task


def load_medmnist(root: str | Path, split: str, flag: str | None = None, size: int | None = None,
                  labels: str | Path | None = None) -> ClassificationSet:
    """One split of a MedMNIST .npz (a file, or `flag`/`size` in a folder); errors name the file and array."""
    split = canonical_split(split)
    path = medmnist_file(root, flag, size)
    flag = flag or _flag_of(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            missing = [k for k in (f"{split}_images", f"{split}_labels") if k not in keys]
            if missing:
                raise DataError(f"{path}: no array {missing[0]!r} (has {sorted(keys)})")
            images, y = npz[f"{split}_images"], npz[f"{split}_labels"]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:  # not a zip, truncated, object arrays (pickles)
        raise DataError(f"{path}: not a readable MedMNIST .npz ({e})") from None
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
        raise DataError(f"{path}: '{split}_images' is {images.dtype} {images.shape}; expected uint8 (N, H, W) "
                        "or (N, H, W, 3)")
    if y.ndim == 1:
        y = y[:, None]
    if y.ndim != 2 or len(y) != len(images) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: '{split}_labels' is {y.dtype} {y.shape}; expected integers (N, 1) or (N, L) "
                        f"with N = {len(images)} images")
    names, task = _label_names_and_task(flag, path, y, labels)
    if task == MULTI_LABEL:
        if y.shape[1] != len(names) or not np.isin(y, (0, 1)).all():
            raise DataError(f"{path}: '{split}_labels' should be 0/1 for each of the {len(names)} labels of "
                            f"{flag}, got shape {y.shape} and values {np.unique(y)[:5].tolist()}")
        y = y.astype(np.int64)
    else:
        if y.shape[1] != 1 or y.min(initial=0) < 0 or y.max(initial=0) >= len(names):
            raise DataError(f"{path}: '{split}_labels' should hold one class id in 0..{len(names) - 1} per image, "
                            f"got shape {y.shape} with values {np.unique(y)[:5].tolist()}")
        y = y[:, 0].astype(np.int64)
    if images.shape[1] not in MEDMNIST_SIZES:
        log.warning("%s: images are %d px, not one of MedMNIST's sizes %s", path, images.shape[1], MEDMNIST_SIZES)
    return ClassificationSet(list(images), y, names, task, split, flag, str(path))


# -- ImageFolder -----------------------------------------------------------------------------------------------
def _split_folder(root: Path, split: str) -> Path | None:
    names = [split] + ([n for n in ("validate", "validation") if split == "val"])
    return next((root / n for n in names if (root / n).is_dir()), None)


def load_image_folder(root: str | Path, split: str) -> ClassificationSet:
    """`root/{split}/{class}/image`; classes are the sorted class folders found in all of root's splits."""
    root, split = Path(root), canonical_split(split)
    if not root.is_dir():
        raise DataError(f"{root}: ImageFolder root not found")
    folder = _split_folder(root, split)
    if folder is None:
        raise DataError(f"{root}: no {split}/ folder (expected ROOT/{{train,val,test}}/CLASS/IMAGE; found "
                        f"{sorted(p.name for p in root.iterdir() if p.is_dir())})")
    splits = [f for f in (_split_folder(root, s) for s in ("train", "val", "test")) if f is not None]
    classes = sorted({c.name for f in splits for c in f.iterdir() if c.is_dir() and not c.name.startswith(".")})
    if len(classes) < 2:
        raise DataError(f"{folder}: found {len(classes)} class folder(s) {classes}; a classifier needs at least two")
    images, labels = [], []
    for index, name in enumerate(classes):
        for path in sorted((folder / name).glob("*")) if (folder / name).is_dir() else []:
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                images.append(path)
                labels.append(index)
    if not images:
        raise DataError(f"{folder}: no images in its class folders (suffixes {sorted(IMAGE_SUFFIXES)})")
    task = BINARY if len(classes) == 2 else MULTI_CLASS
    return ClassificationSet(images, np.asarray(labels, dtype=np.int64), tuple(classes), task, split, root.name,
                             str(folder))


# -- datasets --------------------------------------------------------------------------------------------------
def load_hf_classification(name_or_path: str | Path, split: str, image_column: str | None = None,
                           label_column: str | None = None) -> ClassificationSet:
    """A `datasets` split (saved folder, parquet, hub id) with an image and a label column: a ClassLabel
    (its names), a sequence of ClassLabels (multi-label), integers or strings (named by the sorted values)."""
    from .hf import open_dataset, row_image

    hub_split = {"val": "validation"}.get(canonical_split(split), canonical_split(split))
    ds, folder = open_dataset(name_or_path, hub_split)
    columns = list(ds.column_names)
    image_column = image_column or next((c for c in ("image", "img") if c in columns), None)
    label_column = label_column or next((c for c in ("label", "labels", "class") if c in columns), None)
    for flag, col in (("--image-column", image_column), ("--label-column", label_column)):
        if col not in columns:
            raise DataError(f"{name_or_path}: split {hub_split!r} has no column {col!r} (pass {flag}); "
                            f"columns are {columns}")
    feature = ds.features[label_column]
    inner = getattr(feature, "feature", None)
    values = ds[label_column]
    if getattr(inner, "names", None):  # Sequence(ClassLabel): multi-label
        names, task = tuple(inner.names), MULTI_LABEL
        y = np.zeros((len(values), len(names)), dtype=np.int64)
        for i, row in enumerate(values):
            y[i, list(row)] = 1
    else:
        if getattr(feature, "names", None):
            names, y = tuple(feature.names), np.asarray(values, dtype=np.int64)
        elif all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
            y = np.asarray(values, dtype=np.int64)
            names = tuple(str(i) for i in range(int(y.max(initial=0)) + 1))
        else:
            names = tuple(sorted({str(v) for v in values}))
            log.warning("%s: labels are text without a ClassLabel feature: class ids follow the sorted names of "
                        "this split %s", name_or_path, list(names)[:8])
            y = np.asarray([names.index(str(v)) for v in values], dtype=np.int64)
        task = BINARY if len(names) == 2 else MULTI_CLASS
    images = [row_image(v, None, f"{name_or_path}: {hub_split} row {i}") for i, v in enumerate(ds[image_column])]
    name = Path(str(name_or_path)).name if folder else str(name_or_path)
    return ClassificationSet(images, y, names, task, canonical_split(split), name, str(name_or_path))


@dataclass(frozen=True)
class ClassificationFormat:
    load: Callable[..., ClassificationSet]  # (root, split, **options) -> ClassificationSet
    description: str


CLASSIFICATION_FORMATS: dict[str, ClassificationFormat] = {
    "medmnist": ClassificationFormat(load_medmnist, "MedMNIST .npz ({flag}[_{size}].npz)"),
    "imagefolder": ClassificationFormat(load_image_folder, "ROOT/{split}/{class}/image"),
    "hf": ClassificationFormat(load_hf_classification, "datasets: save_to_disk folder, parquet or hub id"),
}


def load_classification(fmt: str, root: str | Path, split: str, **options) -> ClassificationSet:
    """`split` of a classification dataset in format `fmt`; `options` (None = unset) must be ones it takes."""
    if fmt not in CLASSIFICATION_FORMATS:
        raise DataError(f"unknown classification format {fmt!r}; expected one of {sorted(CLASSIFICATION_FORMATS)}")
    load = CLASSIFICATION_FORMATS[fmt].load
    accepted = set(inspect.signature(load).parameters)
    given = {k: v for k, v in options.items() if v is not None}
    unused = sorted(set(given) - accepted)
    if unused:
        raise DataError(f"--format {fmt} takes no {', '.join('--' + k.replace('_', '-') for k in unused)}")
    return load(root, split, **given)


def describe(data: ClassificationSet) -> dict:
    """Counts per class (or per label) of a split, for logs and reports."""
    if data.multi_label:
        counts = data.labels.sum(0).tolist()
    else:
        counts = np.bincount(data.labels, minlength=len(data.label_names)).tolist()
    return {"n": len(data), "task": data.task, "counts": dict(zip(data.label_names, counts))}


def info_entry(names: Sequence[str], task: str, description: str = "", n_channels: int = 1,
               n_samples: dict | None = None) -> dict:
    """A MedMNIST-INFO-style entry (what `{flag}.json` beside an npz holds)."""
    return {"description": description, "task": task, "label": {str(i): n for i, n in enumerate(names)},
            "n_channels": n_channels, "n_samples": n_samples or {}}


__all__ = ["BINARY", "CLASSIFICATION_FORMATS", "ClassificationSet", "MULTI_CLASS", "MULTI_LABEL", "ORDINAL",
           "TASKS", "describe", "info_entry", "load_classification", "load_hf_classification",
           "load_image_folder", "load_medmnist", "medmnist_file", "medmnist_info"]
