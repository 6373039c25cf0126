"""PathVQA (He et al., 2020: 32.8k questions about 4,998 pathology images) from its released folder or the hub copy.

The released folder (the authors' `pvqa/`):

    qas/train_vqa.pkl, qas/val_vqa.pkl, qas/test_vqa.pkl   a list of question records each:
        {"img_id": "train_0422", "sent": "What have lost their nuclei?", "label": {"neutrophils": 1},
         "answer_type": "other" | "yes/no", "question_id": ..., "question_type": ...}
    qas/{split}/{split}_qa.pkl                             the same questions as {"image", "question", "answer"}
    images/{train,val,test}/{img_id}.jpg

`qas/{split}_vqa.pkl` is preferred (it carries the answer type); the `_qa.pkl` files have none, so
closed/open is inferred from the answer there (yes/no = closed) and a warning says so. Both key
spellings are accepted in either file. The pickles are read with a restricted unpickler that builds
builtin containers and scalars only: a file naming any other global is refused with the global's
name, and nothing in it runs.

The hub copy (`flaviagiammarino/path-vqa`: Parquet with `image`, `question`, `answer`; splits train,
validation, test) and `datasets` folders go through `load_hf`: no answer type there either, so
closed/open is inferred from yes/no with a warning, as for the VQA-RAD hub copy.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Mapping

from ..errors import DataError
from .record import (CLOSED, OPEN, ImageFinder, Record, UnusableRecord, infer_answer_type, make_record,
                     require_mapping, text_field, usable_records)

log = logging.getLogger(__name__)

SPLITS = {"train": "train", "val": "val", "validate": "val", "validation": "val", "test": "test"}
HUB_SPLITS = {"train": "train", "val": "validation", "test": "test"}  # the hub copy names val "validation"
# PathVQA's own answer types; "yes/no" questions are its closed ones, everything else is open
ANSWER_TYPES = {"yes/no": CLOSED, "closed": CLOSED, "other": OPEN, "open": OPEN, "number": OPEN}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
IMAGE_KEYS, QUESTION_KEYS, ANSWER_KEYS = ("img_id", "image"), ("sent", "question"), ("label", "answer")


def question_file(root: Path, split: str) -> Path:
    """`qas/{split}_vqa.pkl` (with answer types), else `qas/{split}/{split}_qa.pkl`."""
    for path in (root / "qas" / f"{split}_vqa.pkl", root / "qas" / split / f"{split}_qa.pkl"):
        if path.is_file():
            return path
    raise DataError(f"{root}: no PathVQA question file for split {split!r} (expected qas/{split}_vqa.pkl "
                    f"or qas/{split}/{split}_qa.pkl)")


def read_questions(path: Path) -> list:
    """The pickled list of question records, unpickled with builtins only (anything else is refused)."""
    from encoders.mevf_weights import UnsafePickleError, safe_unpickle

    try:
        data = safe_unpickle(path, builtins_only=True)
    except UnsafePickleError as e:
        raise DataError(f"{e}; PathVQA's question files hold plain lists and dicts") from None
    except ValueError as e:
        raise DataError(str(e)) from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a pickled list of question records, got {type(data).__name__}")
    return data


def _key(item: Mapping[str, Any], names: tuple[str, ...], where: str) -> str:
    for name in names:
        if name in item:
            return name
    raise DataError(f"{where}: missing field {names[0]!r} (or {names[1]!r}); the record has {sorted(item)}")


def _answer(item: Mapping[str, Any], where: str) -> str:
    """The answer text: `answer`, or the best-scored key of the `label` dict ({answer: score})."""
    key = _key(item, ANSWER_KEYS, where)
    value = item[key]
    if key == "label" and isinstance(value, Mapping):
        if not value:
            raise UnusableRecord(f"{where}: field 'label' is empty (no answer)")
        scores = {str(k): v for k, v in value.items()}
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scores.values()):
            raise DataError(f"{where}: field 'label' should map answers to scores, got {value!r}")
        return max(scores, key=lambda k: (scores[k], -list(scores).index(k)))  # ties: the first listed
    return text_field(item, key, where)


def _answer_type(item: Mapping[str, Any], where: str) -> str | None:
    """CLOSED / OPEN from PathVQA's own `answer_type`; None when the record has none (inferred later)."""
    if item.get("answer_type") is None:
        return None
    raw = str(item["answer_type"]).strip().lower()
    if raw not in ANSWER_TYPES:
        raise DataError(f"{where}: field 'answer_type' is {item['answer_type']!r}; expected 'yes/no' or 'other'")
    return ANSWER_TYPES[raw]


def _find(find_image: ImageFinder, name: str, where: str) -> Path:
    """`img_id` is the file name without its extension ('train_0422' -> train_0422.jpg)."""
    if Path(name).suffix.lower() in IMAGE_SUFFIXES:
        return find_image(name, where)
    for suffix in IMAGE_SUFFIXES:
        for folder in find_image.folders:
            if (folder / f"{name}{suffix}").is_file():
                return find_image(f"{name}{suffix}", where)
    return find_image(f"{name}{IMAGE_SUFFIXES[0]}", where)  # the usual case, and the error naming it


def load_pathvqa(root: str | Path, split: str, lang: str = "en", strict: bool = False,
                 skipped: list[str] | None = None) -> list[Record]:
    """PathVQA `split` (train, val, test) from the released folder, or from `datasets` (hub id, parquet, saved).

    Closed/open comes from the record's `answer_type` ("yes/no" is closed); records without one
    (the `_qa.pkl` files, the hub copy) have it inferred from the answer, with a warning."""
    from .local import check_english

    check_english("PathVQA", lang)
    if split not in SPLITS:
        raise DataError(f"PathVQA split {split!r} unknown; expected 'train', 'val' or 'test'")
    split = SPLITS[split]
    path_root = Path(root)
    if not (path_root / "qas").is_dir():
        if path_root.is_dir() and not any(path_root.rglob("*.parquet")) and not (
                (path_root / "dataset_dict.json").is_file() or (path_root / "dataset_info.json").is_file()):
            raise DataError(f"{path_root}: not a PathVQA folder (no qas/ with the question pickles) nor a "
                            "`datasets` folder (parquet files or save_to_disk)")
        from .hf import load_hf

        return load_hf(root, HUB_SPLITS[split], lang=lang, dataset="pathvqa", strict=strict, skipped=skipped)
    path = question_file(path_root, split)
    items = read_questions(path)
    find_image = ImageFinder([path_root / "images" / split, path_root / "images", path_root])
    inferred: list[int] = []

    def build(i: int, item: object) -> Record:
        where = f"{path}: record {i}"
        item = require_mapping(item, where)
        answer = _answer(item, where)
        answer_type = _answer_type(item, where)
        if answer_type is None:
            inferred.append(i)
        image_key = _key(item, IMAGE_KEYS, where)
        record = make_record(
            image=_find(find_image, text_field(item, image_key, where), where),
            question=text_field(item, _key(item, QUESTION_KEYS, where), where),
            answer=answer, answer_type=answer_type or CLOSED, question_type=item.get("question_type"),
            split=split, source_id=item.get("question_id", i), dataset="pathvqa")
        if answer_type is None:  # decided on the normalised answer, as load_hf does
            record = dataclasses.replace(record, answer_type=infer_answer_type(record.answer))
        return record

    records = usable_records(items, build, path, strict, skipped)
    if inferred:
        log.warning("%s: %d of %d records have no answer_type: closed/open inferred from the answer "
                    "(yes/no = closed)", path, len(inferred), len(items))
    return records
