"""Records and dataset loaders: one record type for VQA-RAD, SLAKE, PMC-VQA and `datasets` sources."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..errors import DataError
from .hf import load_hf, save_hf
from .local import load_pmc_vqa, load_slake, load_vqa_rad
from .record import (CLOSED, OPEN, Record, canonical_question_type, carve_validation, image_key,
                     infer_answer_type)

FORMATS: dict[str, Callable[..., list[Record]]] = {
    "vqa-rad": load_vqa_rad,
    "slake": load_slake,
    "pmc-vqa": load_pmc_vqa,
    "hf": load_hf,
}


def load_records(fmt: str, root: str | Path, split: str, **kwargs) -> list[Record]:
    """Load `split` of a dataset in format `fmt` (vqa-rad, slake, pmc-vqa, hf) from `root`."""
    if fmt not in FORMATS:
        raise DataError(f"unknown dataset format {fmt!r}; expected one of {sorted(FORMATS)}")
    return FORMATS[fmt](root, split, **kwargs)


__all__ = [
    "CLOSED", "OPEN", "FORMATS", "DataError", "Record", "canonical_question_type", "carve_validation",
    "image_key", "infer_answer_type", "load_hf", "load_pmc_vqa", "load_records", "load_slake",
    "load_vqa_rad", "save_hf",
]
