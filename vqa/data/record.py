"""The one record type every dataset is read into, and the rules shared by all loaders."""
from __future__ import annotations

import hashlib
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from PIL import Image

from ..errors import DataError
from ..text import normalize_answer

log = logging.getLogger(__name__)

CLOSED, OPEN = "CLOSED", "OPEN"
YES_NO = frozenset({"yes", "no"})

# Question types, canonical across benchmarks: VQA-RAD's codes and SLAKE's
# content types map onto one vocabulary so per-type reports line up.
_QUESTION_TYPES = {
    "PRES": "presence", "PRSE": "presence", "PRESENCE": "presence",
    "ABN": "abnormality", "ABNORMALITY": "abnormality",
    "POS": "position", "POSITION": "position",
    "MODALITY": "modality", "PLANE": "plane", "ORGAN": "organ",
    "COUNT": "count", "QUANTITY": "count",
    "SIZE": "size", "ATTRIB": "attribute", "ATRIB": "attribute", "ATTRIBUTE": "attribute",
    "COLOR": "color", "SHAPE": "shape", "KG": "knowledge", "OTHER": "other",
}


@dataclass(frozen=True)
class Record:
    """One question about one image, whatever dataset it came from."""

    image: Path | Image.Image
    question: str
    answer: str  # normalised (vqa.text.normalize_answer)
    answer_type: str  # CLOSED | OPEN
    question_type: str  # canonical, e.g. "modality", "position+presence"
    choices: tuple[str, ...] = ()  # multiple choice (PMC-VQA), normalised
    split: str = ""
    source_id: str = ""
    dataset: str = ""


def canonical_question_type(raw: object) -> str:
    """'PRES, POS' (or 'POS, PRES': one type) -> 'position+presence'; 'Quantity' -> 'count'; empty -> 'unknown'."""
    parts = [p.strip() for p in re.split(r"[,+]", str(raw or "")) if p.strip()]  # '+': already canonical (saved)
    if not parts:
        return "unknown"
    return "+".join(sorted({_QUESTION_TYPES.get(p.upper(), p.lower()) for p in parts}))


def parse_answer_type(raw: object, where: str) -> str:
    """'CLOSED' / 'open ' -> 'CLOSED' / 'OPEN'; anything else is a DataError naming `where`."""
    value = str(raw).strip().upper()
    if value not in (CLOSED, OPEN):
        raise DataError(f"{where}: field 'answer_type' is {raw!r}; expected 'CLOSED' or 'OPEN'")
    return value


def infer_answer_type(answer: str) -> str:
    """Closed when the (normalised) answer is yes/no: the rule for sources without answer_type."""
    return CLOSED if answer in YES_NO else OPEN


class UnusableRecord(DataError):
    """A question that cannot be used (its question or answer is empty): loaders skip it with a
    warning that counts them, or refuse it with `strict`."""


def require_mapping(item: object, where: str) -> Mapping[str, Any]:
    if not isinstance(item, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(item).__name__}")
    return item


def text_field(item: Mapping[str, Any], name: str, where: str) -> str:
    """A field as text. Numbers are converted as written; anything else that is not a string (a list,
    true/false, null, an object) is a DataError naming the type; an empty field is an UnusableRecord."""
    if name not in item:
        raise DataError(f"{where}: missing field {name!r}")
    value = item[name]
    if value is None:
        raise DataError(f"{where}: field {name!r} is null; expected text")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        shown = repr(value)
        raise DataError(f"{where}: field {name!r} is a {type(value).__name__} "
                        f"({shown if len(shown) <= 60 else shown[:57] + '...'}); expected text")
    text = str(value)
    if not text.strip():
        raise UnusableRecord(f"{where}: field {name!r} is empty")
    return text


def require_fields(item: object, fields: Sequence[str], where: str) -> Mapping[str, Any]:
    """`item` as a mapping whose `fields` are all usable text (see `text_field`)."""
    item = require_mapping(item, where)
    for name in fields:
        text_field(item, name, where)
    return item


def usable_records(items: Iterable[Any], build: Callable[[int, Any], Record | None], source: object,
                   strict: bool = False, skipped: list[str] | None = None) -> list[Record]:
    """`build(i, item)` for every item (None: filtered out). An `UnusableRecord` is skipped, counted in a
    warning naming the first few and appended to `skipped`, or raised with `strict`: one unusable question
    must not block thousands of good ones (SLAKE 1.0's train.json has an empty answer)."""
    records, here = [], []
    for i, item in enumerate(items):
        try:
            record = build(i, item)
        except UnusableRecord as e:
            if strict:
                raise DataError(f"{e} (refused under --strict; without it such questions are skipped)") from None
            here.append(str(e))
            continue
        if record is not None:
            records.append(record)
    if here:
        log.warning("%s: skipped %d unusable question(s) with an empty question or answer, e.g. %s "
                    "(--strict refuses them)", source, len(here), "; ".join(here[:3]))
        if skipped is not None:
            skipped.extend(here)
    return records


class ImageFinder:
    """Finds image files under a list of candidate folders; a missing image, or a name that leaves
    the folders (`../../etc/hostname`, an absolute path), is an error. The name is what is checked: an image
    stored as a link to elsewhere (git-annex, DVC) is the dataset's own."""

    def __init__(self, folders: Iterable[Path]):
        self.folders = [Path(f) for f in folders]
        self._found: dict[str, Path] = {}

    def __call__(self, name: str, where: str) -> Path:
        if name in self._found:
            return self._found[name]
        for folder in self.folders:
            path = folder / name
            if path.is_file():
                # a name can only go down (no "..", not absolute): links below are followed, never climbed out of
                if Path(name).is_absolute() or ".." in Path(name).parts:
                    raise DataError(f"{where}: image path {name!r} leaves the dataset folder {folder}")
                self._found[name] = path
                return path
            if path.is_dir() and (folder / name).resolve() != folder.resolve():
                raise DataError(f"{where}: image {name!r} is a directory, not an image file ({path})")
        looked = ", ".join(str(f) for f in self.folders)
        raise DataError(f"{where}: image {name!r} not found (looked in {looked})")


def make_record(*, image: Path | Image.Image, question: object, answer: object, answer_type: str,
                question_type: object, split: str, source_id: object, dataset: str,
                choices: Sequence[object] = ()) -> Record:
    """Build a Record, normalising the answer, choices and question type the same way for all.

    An answer that normalises to nothing (only articles or punctuation) is an UnusableRecord."""
    normalized = normalize_answer(answer)
    if not normalized:
        raise UnusableRecord(f"{dataset} question {source_id}: answer {answer!r} is empty once normalised")
    return Record(
        image=image,
        question=" ".join(str(question).split()),
        answer=normalized,
        answer_type=answer_type,
        question_type=canonical_question_type(question_type),
        choices=tuple(normalize_answer(c) for c in choices),
        split=split,
        source_id=str(source_id),
        dataset=dataset,
    )


def image_key(record: Record) -> str:
    """A key that groups the questions of one image."""
    if isinstance(record.image, Path):
        return str(record.image)
    # In-memory images (from `datasets`) are grouped by content, which is stable across runs.
    return hashlib.sha1(record.image.tobytes()).hexdigest()


def carve_validation(records: Sequence[Record], fraction: float = 0.1, seed: int = 0,
                     by: str = "image") -> tuple[list[Record], list[Record]]:
    """Split training records into (train, validation), deterministically.

    Model selection uses this split, never the test set (the references chose
    their best epoch on test). `by="image"` keeps one image's questions together
    (held-out images, as the phantom's splits); `by="question"` holds out
    questions, as VQA-RAD's own train/test split does (its test images all
    appear in train), so validation resembles that test set. Copies of one
    question about one image stay on one side: VQA-RAD's train repeats about
    470, and split apart they put a question the head was trained on in 30% of
    validation (against 3% of test), which flatters the selected epoch and
    makes the calibration fitted there overconfident.
    """
    if not 0.0 < fraction < 1.0:
        raise DataError(f"validation fraction must be in (0, 1), got {fraction}")
    if by not in ("image", "question"):
        raise DataError(f"validation split by {by!r}: expected 'image' or 'question'")
    key = image_key if by == "image" else (lambda r: f"{image_key(r)}#{' '.join(r.question.lower().split())}")
    keys = sorted({key(r) for r in records})
    random.Random(seed).shuffle(keys)
    if len(keys) < 2:  # else one side would be empty: no epoch could be chosen, or nothing trained
        raise DataError(f"cannot carve a validation split from {len(keys)} {by}(s): name a validation split "
                        f"(--val-split) or train on more {by}s")
    n_val = min(max(1, round(len(keys) * fraction)), len(keys) - 1)
    val_keys = set(keys[:n_val])
    train = [r for r in records if key(r) not in val_keys]
    val = [r for r in records if key(r) in val_keys]
    return train, val
