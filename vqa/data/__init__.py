"""Records and dataset loaders: one record type for VQA-RAD, SLAKE, PMC-VQA, PathVQA and `datasets` sources;
image classification sets (MedMNIST, ImageFolder, `datasets`) in `vqa.data.classification`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import DataError
from .hf import load_hf, save_hf
from .local import load_pmc_vqa, load_slake, load_vqa_rad
from .pathvqa import load_pathvqa
from .record import (CLOSED, OPEN, Record, canonical_question_type, carve_validation, image_key,
                     infer_answer_type)

@dataclass(frozen=True)
class DatasetFormat:
    """A benchmark's on-disk format: its loader, its released splits, and the split to select models on."""

    load: Callable[..., list[Record]]  # (root, split, lang="en", ...) -> records
    splits: tuple[str, ...]
    validation_split: str | None = None  # None: carve validation from train (the benchmark has none)


FORMATS: dict[str, DatasetFormat] = {
    "vqa-rad": DatasetFormat(load_vqa_rad, ("train", "test")),
    "slake": DatasetFormat(load_slake, ("train", "validate", "test"), validation_split="validate"),
    "pmc-vqa": DatasetFormat(load_pmc_vqa, ("train", "test")),
    "pathvqa": DatasetFormat(load_pathvqa, ("train", "val", "test"), validation_split="val"),
    "hf": DatasetFormat(load_hf, ("train", "test")),
}


def dataset_format(fmt: str) -> DatasetFormat:
    if fmt not in FORMATS:
        raise DataError(f"unknown dataset format {fmt!r}; expected one of {sorted(FORMATS)}")
    return FORMATS[fmt]


def is_test_split(split: str | None) -> bool:
    """Whether a split name names test data: `test`, or a test file by its own name (PMC-VQA's `test_clean`,
    `test_2`, `test.csv`), which model selection and refitting must treat as test."""
    return isinstance(split, str) and split.lower().startswith("test")


def load_records(fmt: str, root: str | Path, split: str, **kwargs) -> list[Record]:
    """Load `split` of a dataset in format `fmt` (vqa-rad, slake, pmc-vqa, pathvqa, hf) from `root`."""
    return dataset_format(fmt).load(root, split, **kwargs)


__all__ = [
    "CLOSED", "OPEN", "FORMATS", "DataError", "DatasetFormat", "dataset_format", "Record", "canonical_question_type", "carve_validation",
    "image_key", "infer_answer_type", "is_test_split", "load_hf", "load_pathvqa", "load_pmc_vqa", "load_records", "load_slake",
    "load_vqa_rad", "save_hf",
]
