"""Loaders for the benchmarks' own released files in a local folder: VQA-RAD, SLAKE, PMC-VQA."""
from __future__ import annotations

import collections
import logging
import re
from pathlib import Path

from ..errors import DataError
from ..io import read_csv_numbered, read_json
from ..text import normalize_answer
from .record import (ImageFinder, Record, UnusableRecord, infer_answer_type, make_record, parse_answer_type,
                     require_fields, require_mapping, text_field, usable_records)

log = logging.getLogger(__name__)
VQA_RAD_SPLIT_FILES = {"train": "trainset.json", "test": "testset.json"}
VQA_RAD_OFFICIAL = "VQA_RAD_Dataset_Public.json"
SLAKE_SPLITS = {"train": "train", "validate": "validate", "val": "validate", "validation": "validate",
                "test": "test"}
PMC_CHOICE_COLUMNS = ("Choice A", "Choice B", "Choice C", "Choice D")
_CHOICE_PREFIX = re.compile(r"^\s*([A-D])\s*:\s*")  # the release writes 'A:text'; 'C. difficile' is a choice's text


def _list_of_items(data: object, path: Path) -> list:
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of questions, got {type(data).__name__}")
    return data


def _check_root(root: str | Path, name: str) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: {name} folder not found")
    return root


def check_english(dataset: str, lang: str) -> None:
    """VQA-RAD and PMC-VQA are English only: `lang` may be "en" or "all", nothing else."""
    if lang not in ("en", "all"):
        raise DataError(f"{dataset} has English questions only; --lang {lang!r} selects none (use en or all)")


def check_language(path: Path, items: list, lang: str, records: list[Record]) -> None:
    """Zero questions is not a dataset: when `lang` kept none of a file's questions, say which languages it has."""
    if records or lang == "all" or not items:
        return
    counts = collections.Counter(str(it.get("q_lang", "en")) for it in items if isinstance(it, dict))
    if counts and lang not in counts:
        have = ", ".join(f"{n} {code!r}" for code, n in counts.most_common())
        raise DataError(f"{path}: no questions in language {lang!r}; the file has {have}: pass "
                        f"--lang {counts.most_common(1)[0][0]} (or --lang all)")


def load_vqa_rad(root: str | Path, split: str, lang: str = "en", freeform_only: bool = False,
                 strict: bool = False, skipped: list[str] | None = None) -> list[Record]:
    """VQA-RAD from a folder holding MEVF's `trainset.json`/`testset.json` or the official release.

    `split` is "train" or "test" (the standard split), or "all" (the official JSON).
    Without the split files, the official JSON is split as MEVF's files are: by `phrase_type`
    (`test_freeform`/`test_para` are test), the templated version of a question (`question_frame`)
    a training question of its own, that of a test question too (3,064 / 451). `freeform_only` keeps MEVF's
    published subset (308 freeform test questions). A question with an empty question or
    answer is skipped with a warning (listed in `skipped`), or refused with `strict`.
    """
    check_english("VQA-RAD", lang)
    root = _check_root(root, "VQA-RAD")
    if split not in (*VQA_RAD_SPLIT_FILES, "all"):
        raise DataError(f"VQA-RAD split {split!r} unknown; expected 'train', 'test' or 'all'")
    split_file = root / VQA_RAD_SPLIT_FILES.get(split, "")
    if split != "all" and split_file.is_file():
        path, items = split_file, _list_of_items(read_json(split_file), split_file)
    else:
        path = root / VQA_RAD_OFFICIAL
        if not path.is_file():
            expected = f"{split_file.name} or {VQA_RAD_OFFICIAL}" if split != "all" else VQA_RAD_OFFICIAL
            raise DataError(f"{root}: no VQA-RAD question file (expected {expected})")
        items = _list_of_items(read_json(path), path)
        frames = [{**it, "question": it["question_frame"], "phrase_type": "frame", "qid": f"{it.get('qid')}/frame"}
                  for it in items if isinstance(it, dict) and it.get("question_frame") not in (None, "", "NULL")]
        if split != "all":
            want_test = split == "test"
            items = [it for it in items if isinstance(it, dict)
                     and str(it.get("phrase_type", "")).startswith("test_") == want_test]
        items += frames if split != "test" else []
    find_image = ImageFinder([root / "images", root / "VQA_RAD Image Folder", root])

    def build(i: int, item: object) -> Record | None:
        where = f"{path}: item {i}"
        require_fields(item, ("image_name", "question", "answer", "answer_type"), where)
        if freeform_only and item.get("phrase_type") not in ("freeform", "test_freeform"):
            return None
        return make_record(
            image=find_image(text_field(item, "image_name", where), where),
            question=item["question"],
            answer=item["answer"],
            answer_type=parse_answer_type(item["answer_type"], where),
            question_type=item.get("question_type"),
            split=split,
            source_id=item.get("qid", i),
            dataset="vqa-rad",
        )
    return usable_records(items, build, path, strict, skipped)


def load_slake(root: str | Path, split: str, lang: str = "en", strict: bool = False,
               skipped: list[str] | None = None) -> list[Record]:
    """SLAKE from its released folder (`train.json`/`validate.json`/`test.json`, `imgs/`).

    `lang` keeps one language ("en" as the published English results, "zh"), or "all".
    A question with an empty question or answer (SLAKE 1.0's train.json has one) is skipped
    with a warning (listed in `skipped`), or refused with `strict`.
    """
    root = _check_root(root, "SLAKE")
    if split not in SLAKE_SPLITS:
        raise DataError(f"SLAKE split {split!r} unknown; expected 'train', 'validate' or 'test'")
    split = SLAKE_SPLITS[split]
    path = root / f"{split}.json"
    if split == "validate" and not path.is_file() and (root / "validation.json").is_file():
        path = root / "validation.json"  # the Hub copy's name for it since 2024 (BoKelvin/SLAKE)
    items = _list_of_items(read_json(path), path)
    find_image = ImageFinder([root / "imgs", root])

    def build(i: int, item: object) -> Record | None:
        where = f"{path}: item {i}"
        item = require_mapping(item, where)
        if lang != "all" and item.get("q_lang", "en") != lang:
            return None
        require_fields(item, ("img_name", "question", "answer", "answer_type"), where)
        return make_record(
            image=find_image(text_field(item, "img_name", where), where),
            question=item["question"],
            answer=item["answer"],
            answer_type=parse_answer_type(item["answer_type"], where),
            question_type=item.get("content_type"),
            split=split,
            source_id=item.get("qid", i),
            dataset="slake",
        )
    records = usable_records(items, build, path, strict, skipped)
    check_language(path, items, lang, records)
    return records


def _pmc_split_file(root: Path, split: str) -> Path:
    """The CSV of `split`: `NAME.csv` or, for train and test, the first of the release's versions here (v1
    `test.csv`, v2 `test_2.csv`, `test_clean.csv`: the 2,000 checked questions the published numbers use), said
    in a warning where there are several; a file's own name (`test_clean`, `test_2`, `test.csv`) picks one."""
    if split.endswith(".csv") and (root / split).is_file():
        return root / split
    names = [f"{split}.csv", f"{split}_2.csv"] + (["test_clean.csv"] if split == "test" else [])
    found = [name for name in names if (root / name).is_file()]
    if not found:
        raise DataError(f"{root}: no PMC-VQA file for split {split!r} (expected one of {names})")
    if len(found) > 1:
        log.warning("%s: PMC-VQA split %r read from %s; the folder also holds %s (pass the file's name as the split, "
                    "e.g. test_clean, the 2,000 checked questions the published numbers use)", root, split, found[0],
                    ", ".join(found[1:]))
    return root / found[0]


def _pmc_answer(row: dict[str, str], choices: list[str], where: str) -> str:
    """The chosen choice: `Answer_label` or `Answer` as a letter, else `Answer` as the choice text."""
    for column in ("Answer_label", "Answer"):
        value = (row.get(column) or "").strip()
        if len(value) == 1 and value in "ABCD":
            return choices["ABCD".index(value)]
    answer = row.get("Answer") or ""
    text = normalize_answer(_CHOICE_PREFIX.sub("", answer))
    if text not in {normalize_answer(c) for c in choices}:
        raise DataError(f"{where}: answer {answer!r} is none of the choices {choices}")
    return text


def load_pmc_vqa(root: str | Path, split: str, lang: str = "en", strict: bool = False,
                 skipped: list[str] | None = None) -> list[Record]:
    """PMC-VQA multiple choice from its CSV (`train.csv`, `test.csv`, `*_2.csv`, `test_clean.csv`).

    Choices are written `A:text`; the answer is `Answer_label` (a letter) or `Answer`.
    PMC-VQA has no answer type: yes/no answers count as closed, the rest open. A row with an
    empty question, choice or answer is skipped with a warning, or refused with `strict`.
    """
    check_english("PMC-VQA", lang)
    root = _check_root(root, "PMC-VQA")
    path = _pmc_split_file(root, split)
    rows = read_csv_numbered(path, ("Figure_path", "Question", *PMC_CHOICE_COLUMNS))  # a quoted field may span lines
    find_image = ImageFinder([root / "images", root / "figures", root])

    def build(i: int, numbered: tuple[int, dict]) -> Record:
        line, row = numbered
        where = f"{path}: line {line}"
        for column in ("Figure_path", "Question", *PMC_CHOICE_COLUMNS):
            if not (row.get(column) or "").strip():
                raise UnusableRecord(f"{where}: column {column!r} is empty")
        if not (row.get("Answer") or row.get("Answer_label") or "").strip():
            raise UnusableRecord(f"{where}: the answer (column 'Answer' or 'Answer_label') is empty")
        choices = [_CHOICE_PREFIX.sub("", row[c]).strip() for c in PMC_CHOICE_COLUMNS]
        answer = normalize_answer(_pmc_answer(row, choices, where))
        return make_record(
            image=find_image(row["Figure_path"].strip(), where),
            question=row["Question"],
            answer=answer,
            answer_type=infer_answer_type(answer),
            question_type=row.get("question_type"),
            choices=choices,
            split=split,
            source_id=row.get("index") or i,
            dataset="pmc-vqa",
        )
    return usable_records(rows, build, path, strict, skipped)
