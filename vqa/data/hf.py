"""The same benchmarks through Hugging Face `datasets`: a hub id online, a saved or parquet folder offline."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

from PIL import Image

from ..errors import DataError
from ..io import atomic_dir
from ..text import normalize_answer
from .local import PMC_CHOICE_COLUMNS, _CHOICE_PREFIX, _pmc_answer, check_language
from .record import ImageFinder, Record, infer_answer_type, make_record, parse_answer_type, text_field, usable_records

log = logging.getLogger(__name__)

# Column names seen in the hub copies (flaviagiammarino/vqa-rad, BoKelvin/SLAKE,
# PMC-VQA's CSVs) and in what `save_hf` writes; the first one present is used.
_IMAGE = ("image", "img_name", "image_name", "Figure_path", "image_path")
_QUESTION = ("question", "Question")
_ANSWER = ("answer", "Answer")
_QUESTION_TYPE = ("question_type", "content_type")
_SOURCE_ID = ("source_id", "qid", "id", "index")


def _first(columns: Sequence[str], names: Sequence[str]) -> str | None:
    return next((n for n in names if n in columns), None)


def open_dataset(name_or_path: str | Path, split: str) -> tuple[Any, Path | None]:
    """The split as a `datasets.Dataset`, and the local folder it came from (None for the hub)."""
    import datasets

    path = Path(name_or_path)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise DataError(f"{path}: no split {split!r} (has {sorted(loaded)})")
                return loaded[split], path
            saved = None if loaded.split is None else str(loaded.split)
            if saved is None:  # Dataset.from_dict(...).save_to_disk: nothing says which split it holds
                log.warning("%s: one dataset that records no split: read as split %r", path, split)
            elif saved != split:  # another split served as this one would score a model on what it trained on
                raise DataError(f"{path}: a saved dataset of split {saved!r}, not {split!r}")
            return loaded, path
        files = sorted(str(p) for p in path.rglob("*.parquet") if p.name.startswith(f"{split}-")
                       or p.parent.name == split)
        if not files:
            raise DataError(f"{path}: neither a saved dataset (dataset_dict.json) nor parquet files "
                            f"for split {split!r} ({split}-*.parquet or {split}/*.parquet)")
        return datasets.load_dataset("parquet", data_files=files, split="train"), path
    if path.exists() or str(name_or_path).startswith((".", "/")):
        raise DataError(f"{path}: dataset folder not found")
    try:
        return datasets.load_dataset(str(name_or_path), split=split), None
    except Exception as e:  # the hub raises many types; the user needs the id and the reason
        raise DataError(f"{name_or_path}: could not load split {split!r} from the hub ({e})") from None


def row_image(value: Any, find_image: ImageFinder | None, where: str) -> Path | Image.Image:
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, Mapping) and value.get("bytes"):
        import io

        from encoders.images import check_pixels

        try:  # the header only: decoded when the feature cache reads it (a split's images never all in memory)
            image = Image.open(io.BytesIO(value["bytes"]))
            check_pixels(*image.size, Path(value.get("path") or "image"))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise DataError(f"{where}: the image bytes are not a readable image ({e})") from None
        return image
    name = value.get("path") if isinstance(value, Mapping) else value
    if not name:
        raise DataError(f"{where}: empty image field")
    if find_image is None:
        raise DataError(f"{where}: image {name!r} is a file name, and a source from the Hub has no folder to find "
                        "it in: save the dataset with its images (a folder holding them, or imgs/ or images/ "
                        "beside it), or read the release's own files (e.g. --format slake)")
    return find_image(str(name), where)


def load_hf(name_or_path: str | Path, split: str, image_root: str | Path | None = None,
            lang: str = "en", dataset: str | None = None, strict: bool = False,
            skipped: list[str] | None = None) -> list[Record]:
    """Records from a `datasets` source: a `save_to_disk` folder, parquet files or a hub id.

    Hub copies can lack fields: without `answer_type` (flaviagiammarino/vqa-rad),
    closed/open is inferred (yes/no answers are closed) and a warning says so.
    """
    ds, folder = open_dataset(name_or_path, split)
    columns = list(ds.column_names)
    if lang not in ("en", "all") and "q_lang" not in columns:  # a copy without languages is English's (VQA-RAD's)
        raise DataError(f"{name_or_path}: split {split!r} has no q_lang column, so its questions are read as "
                        f"English: --lang {lang} would keep none of them (pass --lang en)")
    image_col, q_col, a_col = _first(columns, _IMAGE), _first(columns, _QUESTION), _first(columns, _ANSWER)
    for col, names in ((image_col, _IMAGE), (q_col, _QUESTION), (a_col, _ANSWER)):
        if col is None:
            raise DataError(f"{name_or_path}: split {split!r} has no column among {list(names)}; "
                            f"columns are {columns}")
    type_col, id_col = _first(columns, _QUESTION_TYPE), _first(columns, _SOURCE_ID)
    roots = [Path(image_root)] if image_root else ([folder, folder / "imgs", folder / "images"] if folder else [])
    find_image = ImageFinder(roots) if roots else None
    if "answer_type" not in columns:
        log.warning("%s has no answer_type: closed/open inferred from the answer (yes/no = closed)",
                    name_or_path)
    name = dataset or (Path(str(name_or_path)).name if folder else str(name_or_path))
    rows = list(ds) if lang != "all" and "q_lang" in columns else ds

    def build(i: int, row: dict) -> Record | None:
        where = f"{name_or_path}: {split} row {i}"
        if lang != "all" and row.get("q_lang", lang) != lang:
            return None
        if row.get("choices"):
            choices, answer = row["choices"], normalize_answer(text_field(row, a_col, where))
        elif any(c in row for c in PMC_CHOICE_COLUMNS):  # PMC-VQA's columns: its answer letter picks the choice
            choices = [_CHOICE_PREFIX.sub("", text_field(row, c, where)).strip() for c in PMC_CHOICE_COLUMNS
                       if c in row]
            answer = normalize_answer(_pmc_answer(row, choices, where))
        else:
            choices, answer = [], normalize_answer(text_field(row, a_col, where))
        answer_type = (parse_answer_type(row["answer_type"], where) if "answer_type" in columns
                       else infer_answer_type(answer))
        return make_record(
            image=row_image(row[image_col], find_image, where),
            question=text_field(row, q_col, where), answer=answer, answer_type=answer_type,
            question_type=row.get(type_col) if type_col else None,
            choices=choices, split=split,
            source_id=row[id_col] if id_col else i,
            dataset=row.get("dataset") or name,
        )
    records = usable_records(rows, build, name_or_path, strict, skipped)
    if rows is not ds:
        check_language(Path(str(name_or_path)), rows, lang, records)
    return records


def save_hf(splits: Mapping[str, Sequence[Record]], path: str | Path) -> None:
    """Write records as a `datasets.DatasetDict` folder (images embedded) that `load_hf` reads back."""
    import datasets

    features = datasets.Features({
        "image": datasets.Image(),
        "question": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "answer_type": datasets.Value("string"),
        "question_type": datasets.Value("string"),
        "choices": datasets.Sequence(datasets.Value("string")),
        "source_id": datasets.Value("string"),
        "dataset": datasets.Value("string"),
    })

    def column_dict(records: Sequence[Record]) -> dict[str, list]:
        return {
            "image": [str(r.image) if isinstance(r.image, Path) else r.image for r in records],
            "question": [r.question for r in records],
            "answer": [r.answer for r in records],
            "answer_type": [r.answer_type for r in records],
            "question_type": [r.question_type for r in records],
            "choices": [list(r.choices) for r in records],
            "source_id": [r.source_id for r in records],
            "dataset": [r.dataset for r in records],
        }

    dd = datasets.DatasetDict({
        split: datasets.Dataset.from_dict(column_dict(recs), features=features)
        for split, recs in splits.items()
    })
    with atomic_dir(path, overwrite=True) as tmp:
        dd.save_to_disk(str(tmp))
