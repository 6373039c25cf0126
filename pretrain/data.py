"""Image–caption pairs for pretraining, from the formats they are released in.

    pairs = load_captions("runs/phantom/captions", "train")          # PMC-OA-style JSON lines
    pairs = load_captions("path/to/medpix2", "validate")             # finds dev.jsonl
    pairs = load_captions("path/to/roco", "train", fmt="roco")       # ROCO folders
    pairs = load_captions("pairs.csv", fmt="csv", image_column="path", caption_column="text")
    pairs = load_captions("org/dataset", "train", fmt="hf")          # `datasets`: hub id, saved or parquet folder

Formats:
- jsonl: one object per line with `image` and `caption` (PMC-OA, MedPix 2.0, the
  phantom's captions/); a folder holds `{split}.jsonl`. Relative image paths
  resolve against the file's folder. Other scalar fields (modality, plane, ...)
  become labels for zero-shot evaluation.
- csv: the same with columns named by `image_column`/`caption_column`.
- roco: ROCO's folders, either the widely used CSV layout
  `{train,validation,test}/radiology/*.csv` (id, name, caption) + `images/`, or the
  official repository's `data/{split}/radiology/captions.txt` + `dlinks.txt` +
  `images/` (file names `PMCID_name`, as its fetch script writes them).
- hf: a `datasets` source (`save_to_disk` folder, parquet files, or a hub id).

A missing image is an error naming the file (never a silent skip); rows with an
empty caption are dropped with a warning that counts them (ROCO has a few). A
single file is one split: the one its name says (dev.jsonl: validate), else
train. `exclude_vqa_rad` drops the pairs marked `also_in_vqa_rad` (MedPix 2.0)
and refuses pairs that carry no such mark.
"""
from __future__ import annotations

import csv
import logging
import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from PIL import Image

from vqa.errors import DataError
from vqa.io import read_csv, read_jsonl

log = logging.getLogger(__name__)

CAPTION_FORMATS = ("auto", "jsonl", "csv", "roco", "hf")
# Split names are spelled differently across datasets (phantom: validate, MedPix: dev, ROCO: validation).
SPLIT_ALIASES = {
    "train": ("train", "training"),
    "validate": ("validate", "validation", "val", "dev", "valid"),
    "test": ("test", "testing"),
}
MARK = "also_in_vqa_rad"  # MedPix 2.0's field: this pair's image is also one of VQA-RAD's
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class CaptionPair:
    image: Path | Image.Image  # a file, or a decoded image from a `datasets` source
    caption: str
    labels: Mapping[str, str] = field(default_factory=dict)  # e.g. {"modality": "ct"} for zero-shot
    source_id: str = ""


def split_names(split: str) -> tuple[str, ...]:
    """`split` and its other spellings, `split` first."""
    for names in SPLIT_ALIASES.values():
        if split in names:
            return (split, *[n for n in names if n != split])
    return (split,)


def load_captions(source: str | Path, split: str = "train", fmt: str = "auto", *, image_column: str = "image",
                  caption_column: str = "caption", exclude_vqa_rad: bool = False) -> list[CaptionPair]:
    """Caption pairs of one split; raises DataError naming the file, row and field for bad input."""
    if fmt not in CAPTION_FORMATS:
        raise DataError(f"--caption-format {fmt!r}: expected one of {CAPTION_FORMATS}")
    fmt, path = _detect(source, split, fmt)
    if fmt == "jsonl":
        pairs = _from_rows(read_jsonl(path), path, image_column, caption_column, exclude_vqa_rad)
    elif fmt == "csv":
        rows = read_csv(path, required=(image_column, caption_column))
        pairs = _from_rows(rows, path, image_column, caption_column, exclude_vqa_rad)
    elif fmt == "roco":
        pairs = _load_roco(Path(source), split, exclude_vqa_rad)
    else:
        pairs = _load_hf(source, split, image_column, caption_column, exclude_vqa_rad)
    if not pairs:
        raise DataError(f"{path}: no image-caption pairs (split {split!r})")
    log.info("captions: %d pairs from %s (%s, split %s)", len(pairs), path, fmt, split)
    return pairs


def shuffle_captions(pairs: list[CaptionPair], seed: int) -> list[CaptionPair]:
    """The control experiment: the same images and captions, paired at random (seeded)."""
    captions = [p.caption for p in pairs]
    random.Random(seed).shuffle(captions)
    return [replace(p, caption=c) for p, c in zip(pairs, captions)]


# -- format detection -------------------------------------------------------------------------------------------
def _detect(source: str | Path, split: str, fmt: str) -> tuple[str, Path | str]:
    """(format, file or folder or hub id) for `source`."""
    path = Path(source)
    if fmt == "hf":
        return fmt, source
    if path.is_file():
        _check_file_split(path, split)
        if fmt in ("jsonl", "csv"):
            return fmt, path
        if path.suffix.lower() in (".jsonl", ".json"):
            return "jsonl", path
        if path.suffix.lower() in (".csv", ".tsv"):
            return "csv", path
        raise DataError(f"{path}: cannot tell the format from the suffix; pass --caption-format jsonl or csv")
    if path.is_dir():
        if fmt == "roco" or (fmt == "auto" and _looks_like_roco(path)):
            return "roco", path
        for suffix, kind in ((".jsonl", "jsonl"), (".csv", "csv")):
            if fmt not in ("auto", kind):
                continue
            for name in split_names(split):
                if (path / f"{name}{suffix}").is_file():
                    return kind, path / f"{name}{suffix}"
        if fmt == "auto" and ((path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file()
                              or any(path.rglob("*.parquet"))):
            return "hf", path
        raise DataError(f"{path}: no caption file for split {split!r} (looked for "
                        f"{', '.join(n + '.jsonl' for n in split_names(split))}, .csv, ROCO folders, "
                        "and a saved `datasets` folder)")
    if fmt == "auto" and _HUB_ID.match(str(source)) and not str(source).startswith((".", "/", "~")):
        return "hf", source
    raise DataError(f"{source}: caption file or folder not found")


def _check_file_split(path: Path, split: str) -> None:
    """A caption file is one split: the one its name says (dev.jsonl: validate), or train when it names none. Served
    as any split asked for, one file would be the training pairs and the held-out ones at once."""
    stem = path.stem.lower()
    named = next((names[0] for names in SPLIT_ALIASES.values() if stem in names), None)
    if split in split_names(stem) or (named is None and split in SPLIT_ALIASES["train"]):
        return
    served = f"split {named!r}" if named else "the training split (its name names no split)"
    raise DataError(f"{path}: one file is one split, here {served}, so it is not split {split!r}: give that split "
                    f"its own file (a folder of train.jsonl and {split}.jsonl), or, pretraining, --val-split none")


def _looks_like_roco(path: Path) -> bool:
    return (path / "radiology").is_dir() or any((path / d / "radiology").is_dir()
                                                 for d in ("train", "validation", "test")) \
        or (path / "data" / "train" / "radiology").is_dir()


# -- JSON lines and CSV --------------------------------------------------------------------------------------------
def _truthy(value: Any) -> bool:
    return value is True or str(value).strip().lower() in ("true", "1", "yes")


def _from_rows(rows: list[dict], path: Path, image_column: str, caption_column: str,
               exclude_vqa_rad: bool) -> list[CaptionPair]:
    if rows:
        for column in (image_column, caption_column):
            if column not in rows[0]:
                raise DataError(f"{path}: row 1 has no field {column!r}; fields: {sorted(rows[0])} "
                                f"(choose others with --image-column/--caption-column)")
    if exclude_vqa_rad and rows and not any(MARK in row for row in rows):
        raise _unmarked(path)
    pairs, empty, excluded = [], 0, 0
    for i, row in enumerate(rows, 1):
        for column in (image_column, caption_column):
            if column not in row:
                raise DataError(f"{path}: row {i}: missing field {column!r}")
        if exclude_vqa_rad and _truthy(row.get(MARK, False)):
            excluded += 1
            continue
        caption = str(row[caption_column] or "").strip()
        if not caption:
            empty += 1
            continue
        image = _resolve(path.parent, str(row[image_column]), f"{path}: row {i}")
        labels = {k: _label(v) for k, v in row.items()
                  if k not in (image_column, caption_column, MARK) and _is_label(v)}
        pairs.append(CaptionPair(image, caption, labels, str(row.get("id", row.get("case_id", i)))))
    if empty:
        log.warning("%s: dropped %d row(s) with an empty caption", path, empty)
    if excluded:
        log.info("%s: excluded %d pair(s) whose image is also in VQA-RAD", path, excluded)
    return pairs


def _unmarked(source) -> DataError:
    """--exclude-vqa-rad on pairs that cannot say which images VQA-RAD holds: nothing would be excluded, while the
    run (and a shard manifest) said it was."""
    return DataError(f"{source}: --exclude-vqa-rad, but no pair has an {MARK!r} field to say whether VQA-RAD holds its "
                     "image (MedPix 2.0's rows have one): mark the pairs, or leave out --exclude-vqa-rad")


def _is_label(value: Any) -> bool:
    return isinstance(value, (str, bool, int)) and not (isinstance(value, str) and len(value) > 64)


def _label(value: Any) -> str:
    return ("yes" if value else "no") if isinstance(value, bool) else str(value).strip().lower()


def _resolve(root: Path, name: str, where: str) -> Path:
    if not name:
        raise DataError(f"{where}: empty image field")
    path = Path(name) if Path(name).is_absolute() else root / name
    if not path.is_file():
        raise DataError(f"{where}: image file not found: {path}")
    return path


# -- ROCO -------------------------------------------------------------------------------------------------------
def _roco_split_dir(root: Path, split: str) -> Path:
    for name in split_names(split):
        for candidate in (root / name / "radiology", root / "data" / name / "radiology", root / name):
            if candidate.is_dir():
                return candidate
    # --data ROCO/test: one split's folder alone, served only as the split it is named for (train if unnamed)
    alone = (root / "radiology").is_dir()
    named = any(root.name in names for names in SPLIT_ALIASES.values())
    if alone and (root.name in split_names(split) or (not named and split in SPLIT_ALIASES["train"])):
        return root / "radiology"
    raise DataError(f"{root}: no ROCO folder for split {split!r} (expected {split}/radiology/ or "
                    f"data/{split}/radiology/)" + (f"; {root.name}/radiology/ is one split's folder alone, served only "
                                                   "as the split it is named for" if alone else ""))


def _load_roco(root: Path, split: str, exclude_vqa_rad: bool) -> list[CaptionPair]:
    folder = _roco_split_dir(root, split)
    images = (folder / "images").resolve()
    for table in sorted(folder.glob("*.csv")) + sorted(folder.parent.glob("*.csv")):
        with open(table, encoding="utf-8", newline="") as f:
            columns = next(csv.reader(f), [])
        if "name" in columns and "caption" in columns:
            rows = read_csv(table, required=("name", "caption"))
            for row in rows:
                row["name"] = str(images / row["name"])  # an absolute name stays as it is
            return _from_rows(rows, table, "name", "caption", exclude_vqa_rad)
    captions = folder / "captions.txt"
    if captions.is_file():
        return _load_roco_official(folder, images, exclude_vqa_rad)
    raise DataError(f"{folder}: no ROCO caption table (a CSV with columns name, caption, or captions.txt)")


def _tab_file(path: Path) -> dict[str, list[str]]:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 2:
                out[parts[0].strip()] = [p.strip() for p in parts[1:]]
    return out


def _load_roco_official(folder: Path, images: Path, exclude_vqa_rad: bool) -> list[CaptionPair]:
    """captions.txt (ROCO_ID <tab> caption) + dlinks.txt (ROCO_ID <tab> archive URL <tab> file name)."""
    captions, links = _tab_file(folder / "captions.txt"), _tab_file(folder / "dlinks.txt")
    rows = []
    for roco_id, (caption, *_) in captions.items():
        if roco_id not in links:
            raise DataError(f"{folder / 'dlinks.txt'}: no line for {roco_id}")
        url = links[roco_id][0].split()[-1]
        pmc_id = url.rsplit("/", 1)[-1].removesuffix(".tar.gz")
        rows.append({"image": str(images / f"{pmc_id}_{links[roco_id][-1]}"), "caption": caption, "id": roco_id})
    return _from_rows(rows, folder / "captions.txt", "image", "caption", exclude_vqa_rad)


# -- datasets ------------------------------------------------------------------------------------------------------
def _load_hf(source: str | Path, split: str, image_column: str, caption_column: str,
             exclude_vqa_rad: bool) -> list[CaptionPair]:
    from vqa.data.hf import open_dataset, row_image  # the one place that reads `datasets` sources
    from vqa.data.record import ImageFinder

    error = None
    for name in split_names(split):  # the first spelling the source has (hub copies say "validation")
        try:
            ds, folder = open_dataset(source, name)
            break
        except DataError as e:
            error = error or e  # the first names the split that was asked for
    else:
        raise error
    find_image = ImageFinder([folder or Path("/")])
    for column in (image_column, caption_column):
        if column not in ds.column_names:
            raise DataError(f"{source}: split {split!r} has no column {column!r}; columns: {ds.column_names}")
    if exclude_vqa_rad and MARK not in ds.column_names:
        raise _unmarked(f"{source} [{split}]")
    pairs, empty = [], 0
    for i, row in enumerate(ds):
        where = f"{source} [{split}] row {i}"
        if exclude_vqa_rad and _truthy(row.get(MARK, False)):
            continue
        caption = str(row[caption_column] or "").strip()
        if not caption:
            empty += 1
            continue
        labels = {k: _label(v) for k, v in row.items()
                  if k not in (image_column, caption_column, MARK) and _is_label(v)}
        pairs.append(CaptionPair(row_image(row[image_column], find_image, where), caption, labels, str(i)))
    if empty:
        log.warning("%s: dropped %d row(s) with an empty caption", source, empty)
    return pairs


