"""Loaders: the phantom round-trips through every format and `datasets`; bad input is named."""
from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vqa.data import (CLOSED, DataError, Record, carve_validation, image_key, load_hf, load_pmc_vqa,
                      load_records, load_slake, load_vqa_rad, save_hf)
from vqa.data.record import infer_answer_type
from vqa.text import normalize_answer

from .conftest import shared_data


def _expected(root, truth, fmt, split) -> list[Record]:
    """What a loader must return, built from the generator's ground truth, not from the files."""
    out = []
    for t in truth:
        if fmt == "slake" and t["split"] != split:
            continue
        if fmt in ("vqa-rad", "pmc-vqa") and (t["split"] == "test") != (split == "test"):
            continue
        if fmt == "pmc-vqa":
            for c in t["choices"]:
                out.append(Record(root / "pmc-vqa" / "images" / t["file"], c["question"], c["answer"],
                                  infer_answer_type(c["answer"]), "unknown", tuple(c["choices"]), split,
                                  str(len(out)), "pmc-vqa"))
            continue
        image = (root / "vqa-rad" / "images" / t["file"] if fmt == "vqa-rad"
                 else root / "slake" / "imgs" / f"xmlab{t['index']}" / "source.jpg")
        for qa in t["qa"]:
            out.append(Record(image, qa["question"], qa["answer"], qa["answer_type"], qa["kind"], (), split,
                              str(qa["qid"]), fmt))
    return out


@pytest.mark.parametrize("fmt,split", [("vqa-rad", "train"), ("vqa-rad", "test"), ("slake", "train"),
                                       ("slake", "validate"), ("slake", "test"), ("pmc-vqa", "train"),
                                       ("pmc-vqa", "test")])
def test_phantom_round_trips_through_each_format(phantom_dir, phantom_truth, fmt, split):
    records = load_records(fmt, phantom_dir / fmt, split)
    assert records == _expected(phantom_dir, phantom_truth, fmt, split)
    assert len(records) > 0


def test_official_vqa_rad_json_gives_the_same_split(phantom_dir, tmp_path):
    root = tmp_path / "official"
    shutil.copytree(phantom_dir / "vqa-rad", root)
    (root / "trainset.json").unlink()
    (root / "testset.json").unlink()
    for split in ("train", "test"):
        a = load_vqa_rad(phantom_dir / "vqa-rad", split)
        b = load_vqa_rad(root, split)
        assert [(r.question, r.answer, r.answer_type, r.image.name) for r in a] == \
               [(r.question, r.answer, r.answer_type, r.image.name) for r in b]
    assert len(load_vqa_rad(root, "all")) == len(load_vqa_rad(root, "train")) + len(load_vqa_rad(root, "test"))


def test_official_vqa_rad_json_adds_each_templated_question_to_train(phantom_dir, tmp_path):
    """As MEVF's trainset.json: `question_frame` is a training question of its own, a test question's too."""
    root = tmp_path / "official"
    shutil.copytree(phantom_dir / "vqa-rad", root)
    (root / "trainset.json").unlink()
    (root / "testset.json").unlink()
    before = {s: load_vqa_rad(root, s) for s in ("train", "test")}
    items = json.loads((root / "VQA_RAD_Dataset_Public.json").read_text())
    first_test = next(i for i, it in enumerate(items) if it["phrase_type"].startswith("test_"))
    items[0]["question_frame"], items[first_test]["question_frame"] = "Is/Are there a lesion?", "Is this a CT?"
    (root / "VQA_RAD_Dataset_Public.json").write_text(json.dumps(items))
    train, test = load_vqa_rad(root, "train"), load_vqa_rad(root, "test")
    assert len(train) == len(before["train"]) + 2 and len(test) == len(before["test"])
    added = {r.question: (r.answer, r.image.name, str(r.source_id)) for r in train[-2:]}
    assert added["Is this a CT?"][:2] == (before["test"][0].answer, before["test"][0].image.name)
    assert added["Is/Are there a lesion?"][2].endswith("/frame")


def _same_records_with_pixels(from_files, from_hf):
    assert len(from_files) == len(from_hf)
    for a, b in zip(from_files, from_hf):
        assert isinstance(b.image, Image.Image)
        assert (a.question, a.answer, a.answer_type, a.question_type, a.choices, a.source_id, a.split) == \
               (b.question, b.answer, b.answer_type, b.question_type, b.choices, b.source_id, b.split)
        assert np.array_equal(np.asarray(Image.open(a.image)), np.asarray(b.image))


@pytest.mark.parametrize("fmt", ["vqa-rad", "slake", "pmc-vqa"])
def test_phantom_round_trips_through_datasets(phantom_dir, tmp_path, fmt):
    splits = {"train": load_records(fmt, phantom_dir / fmt, "train"),
              "test": load_records(fmt, phantom_dir / fmt, "test")}
    save_hf(splits, tmp_path / "hf")
    for split, records in splits.items():
        _same_records_with_pixels(records, load_hf(tmp_path / "hf", split))


def test_datasets_parquet_folder_and_hub_style_columns(phantom_dir, tmp_path):
    """A parquet folder shaped like flaviagiammarino/vqa-rad (image, question, answer only)."""
    import datasets

    records = load_vqa_rad(phantom_dir / "vqa-rad", "test")
    ds = datasets.Dataset.from_dict(
        {"image": [str(r.image) for r in records], "question": [r.question for r in records],
         "answer": [r.answer.upper() for r in records]},
        features=datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                    "answer": datasets.Value("string")}))
    (tmp_path / "data").mkdir()
    ds.to_parquet(str(tmp_path / "data" / "test-00000-of-00001.parquet"))
    loaded = load_hf(tmp_path, "test")
    assert [r.answer for r in loaded] == [r.answer for r in records]
    # Without answer_type, yes/no answers are closed: exactly the phantom's closed questions.
    assert [r.answer_type for r in loaded] == [r.answer_type for r in records]
    assert all(r.question_type == "unknown" for r in loaded)
    assert len(load_hf(tmp_path, "test", lang="all")) == len(records)
    with pytest.raises(DataError, match="no q_lang column, so its questions are read as English: --lang zh"):
        load_hf(tmp_path, "test", lang="zh")  # an English copy is not another language's questions


def test_pmc_vqa_columns_through_datasets_read_the_answer_letter_as_the_csv_loader_does(phantom_dir, tmp_path):
    import csv

    import datasets

    with open(phantom_dir / "pmc-vqa" / "test.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))[:4]
    for row in rows:  # the answer as its letter only, as some copies give it
        row["Answer"] = row["Answer_label"]
    images = phantom_dir / "pmc-vqa" / "images"
    columns = {k: [r[k] for r in rows] for k in rows[0]}
    datasets.Dataset.from_dict(columns, split="test").save_to_disk(str(tmp_path / "pmc"))
    loaded, csv_records = load_hf(tmp_path / "pmc", "test", images), load_pmc_vqa(phantom_dir / "pmc-vqa", "test")[:4]
    assert [(r.answer, r.choices) for r in loaded] == [(r.answer, r.choices) for r in csv_records]
    assert all(r.answer in r.choices for r in loaded)
    columns["Answer"] = columns["Answer_label"] = ["the left one"] * 4
    datasets.Dataset.from_dict(columns, split="test").save_to_disk(str(tmp_path / "wrong"))
    with pytest.raises(DataError, match="answer 'the left one' is none of the choices"):
        load_hf(tmp_path / "wrong", "test", images, strict=True)


def test_carve_validation_is_by_image_and_deterministic(phantom_dir):
    records = load_vqa_rad(phantom_dir / "vqa-rad", "train")
    train, val = carve_validation(records, 0.2, seed=1)
    assert len(train) + len(val) == len(records) and val
    assert not {image_key(r) for r in train} & {image_key(r) for r in val}
    assert carve_validation(records, 0.2, seed=1) == (train, val)
    assert carve_validation(records, 0.2, seed=2) != (train, val)


# ---------------------------------------------------------------- bad input

def _copy(phantom_dir, tmp_path, fmt):
    root = tmp_path / fmt
    shutil.copytree(phantom_dir / fmt, root)
    return root


def _edit_json(path, edit):
    items = json.loads(path.read_text())
    edit(items)
    path.write_text(json.dumps(items))


def test_vqa_rad_bad_input(phantom_dir, tmp_path):
    root = _copy(phantom_dir, tmp_path, "vqa-rad")
    with pytest.raises(DataError, match="split 'val' unknown"):
        load_vqa_rad(root, "val")
    with pytest.raises(DataError, match="VQA-RAD folder not found"):
        load_vqa_rad(tmp_path / "nowhere", "train")
    _edit_json(root / "testset.json", lambda items: items[3].pop("answer_type"))
    with pytest.raises(DataError, match=r"testset.json: item 3: missing field 'answer_type'"):
        load_vqa_rad(root, "test")
    _edit_json(root / "testset.json", lambda items: items[3].update(answer_type="MAYBE"))
    with pytest.raises(DataError, match=r"item 3: field 'answer_type' is 'MAYBE'"):
        load_vqa_rad(root, "test")
    (root / "trainset.json").write_text('[{"qid": 1,\n "image_name": }]')
    with pytest.raises(DataError, match=r"trainset.json: line 2: invalid JSON"):
        load_vqa_rad(root, "train")
    (root / "trainset.json").write_text('{"not": "a list"}')
    with pytest.raises(DataError, match="expected a JSON list"):
        load_vqa_rad(root, "train")
    (root / "trainset.json").unlink()
    (root / "VQA_RAD_Dataset_Public.json").unlink()
    with pytest.raises(DataError, match="expected trainset.json or VQA_RAD_Dataset_Public.json"):
        load_vqa_rad(root, "train")


def test_missing_image_is_an_error_naming_it(phantom_dir, tmp_path):
    root = _copy(phantom_dir, tmp_path, "slake")
    first = json.loads((root / "test.json").read_text())[0]["img_name"]
    (root / "imgs" / first).unlink()
    with pytest.raises(DataError, match=rf"test.json: item 0: image '{first}' not found"):
        load_slake(root, "test")


def test_slake_language_and_bad_split(phantom_dir, tmp_path):
    root = _copy(phantom_dir, tmp_path, "slake")
    _edit_json(root / "train.json", lambda items: items[0].update(q_lang="zh"))
    n_all = len(load_slake(root, "train", lang="all"))
    assert len(load_slake(root, "train")) == n_all - 1
    assert len(load_slake(root, "train", lang="zh")) == 1
    with pytest.raises(DataError, match="SLAKE split 'dev' unknown"):
        load_slake(root, "dev")
    (root / "validate.json").unlink()
    with pytest.raises(DataError, match="validate.json: file not found"):
        load_slake(root, "val")


def _rewrite_csv(path, edit):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    edit(rows)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def test_pmc_vqa_bad_input(phantom_dir, tmp_path):
    root = _copy(phantom_dir, tmp_path, "pmc-vqa")
    _rewrite_csv(root / "test.csv", lambda rows: [r.pop(3) for r in rows])  # drop 'Choice A'
    with pytest.raises(DataError, match=r"test.csv: missing column\(s\) \['Choice A'\]"):
        load_pmc_vqa(root, "test")

    def wrong_answer(rows):
        h = rows[0]
        rows[2][h.index("Answer")] = "banana"
        rows[2][h.index("Answer_label")] = ""

    _rewrite_csv(root / "train.csv", wrong_answer)
    with pytest.raises(DataError, match=r"train.csv: line 3: answer 'banana' is none of the choices"):
        load_pmc_vqa(root, "train")

    def question_on_two_lines(rows):  # a quoted field may hold a newline: the file's lines, not its rows, count
        rows[1][rows[0].index("Question")] += "\nWhich one?"

    _rewrite_csv(root / "train.csv", question_on_two_lines)
    with pytest.raises(DataError, match=r"train.csv: line 4: answer 'banana' is none of the choices"):
        load_pmc_vqa(root, "train")
    with pytest.raises(DataError, match="no PMC-VQA file for split 'validate'"):
        load_pmc_vqa(root, "validate")


def test_pmc_vqa_release_files_are_said_and_named(phantom_dir, tmp_path, caplog):
    """The release holds v1 test.csv, v2 test_2.csv and test_clean.csv (the published numbers' 2,000 questions):
    `test` reads the first as before, saying which among several; a file's own name picks one; 'C. difficile' is a
    choice, not a prefix."""
    import shutil

    root = _copy(phantom_dir, tmp_path, "pmc-vqa")
    expected = load_pmc_vqa(root, "test")
    shutil.copy(root / "test.csv", root / "test_clean.csv")
    with caplog.at_level("WARNING"):
        assert load_pmc_vqa(root, "test") == expected
    assert "read from test.csv; the folder also holds test_clean.csv" in caplog.text
    assert load_pmc_vqa(root, "test_clean") == [dataclasses.replace(r, split="test_clean") for r in expected]
    assert load_pmc_vqa(root, "test.csv") == [dataclasses.replace(r, split="test.csv") for r in expected]

    def bacterium(rows):
        h = rows[0]
        rows[1][h.index("Choice C")] = "C:C. difficile colitis"
        rows[1][h.index("Answer")], rows[1][h.index("Answer_label")] = "C. difficile colitis", ""

    _rewrite_csv(root / "test_clean.csv", bacterium)
    first = load_pmc_vqa(root, "test_clean")[0]
    assert first.choices[2] == first.answer == normalize_answer("C. difficile colitis") != "difficile colitis"


def test_slake_validation_under_the_hub_copys_name(phantom_dir, tmp_path):
    root = _copy(phantom_dir, tmp_path, "slake")
    expected = load_slake(root, "validate")
    (root / "validate.json").rename(root / "validation.json")  # BoKelvin/SLAKE since 2024
    assert load_slake(root, "validate") == expected


def test_pmc_vqa_answer_as_letter_or_text(phantom_dir, tmp_path):
    root = _copy(phantom_dir, tmp_path, "pmc-vqa")
    expected = load_pmc_vqa(root, "test")
    _rewrite_csv(root / "test.csv", lambda rows: [r.pop() for r in rows])  # no Answer_label: text only
    assert load_pmc_vqa(root, "test") == expected

    def letters(rows):  # train_2.csv style: 'Answer' holds the letter
        for r in rows[1:]:
            r[2] = "ABCD"[[c.split(":", 1)[1].lower() for c in r[3:7]].index(r[2].lower())]

    _rewrite_csv(root / "test.csv", letters)
    assert [r.answer for r in load_pmc_vqa(root, "test")] == [r.answer for r in expected]


def test_hf_bad_input(phantom_dir, tmp_path):
    import datasets

    with pytest.raises(DataError, match="dataset folder not found"):
        load_hf(tmp_path / "missing", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither a saved dataset"):
        load_hf(tmp_path / "empty", "train")
    ds = datasets.Dataset.from_dict({"image": ["a.jpg"], "text": ["hi"], "answer": ["yes"]})
    ds.save_to_disk(str(tmp_path / "noq"))
    with pytest.raises(DataError, match=r"no column among \['question', 'Question'\]"):
        load_hf(tmp_path / "noq", "train")
    with pytest.raises(DataError, match="unknown dataset format 'coco'"):
        load_records("coco", tmp_path, "train")
    junk = datasets.Dataset.from_dict({"image": [{"bytes": b"not a png", "path": "x.png"}], "question": ["q?"],
                                       "answer": ["yes"]})
    junk.save_to_disk(str(tmp_path / "junk"))
    with pytest.raises(DataError, match=r"junk.*row 0.*the image bytes are not a readable image"):
        load_hf(tmp_path / "junk", "train")
    # one split saved alone (load_dataset(..., split="train").save_to_disk): served as that split only
    rows = {"image": ["a.jpg"], "question": ["q?"], "answer": ["yes"]}
    datasets.Dataset.from_dict(rows, split="train").save_to_disk(str(tmp_path / "train-only"))
    with pytest.raises(DataError, match="train-only: a saved dataset of split 'train', not 'test'"):
        load_hf(tmp_path / "train-only", "test")


# ---------------------------------------------------------------- real data (skipped when absent)

def test_real_vqa_rad_standard_split():
    root = shared_data("vqa-rad")
    train, test = load_vqa_rad(root, "train"), load_vqa_rad(root, "test")
    assert (len(train), len(test)) == (3064, 451)
    assert sum(r.answer_type == CLOSED for r in test) == 272
    assert len(load_vqa_rad(root, "test", freeform_only=True)) == 308
    assert all(r.answer_type in ("CLOSED", "OPEN") for r in train)  # 'CLOSED ' is cleaned


def test_real_vqa_rad_official_json_alone_gives_mevfs_split(tmp_path):
    """MEVF's trainset.json holds the templated version (`question_frame`) of every question, of test questions
    too, as a training question of its own: the official JSON alone gives the same 3,064 / 451."""
    import collections

    root = shared_data("vqa-rad")
    official = tmp_path / "official"
    official.mkdir()
    shutil.copy(root / "VQA_RAD_Dataset_Public.json", official)
    (official / "images").symlink_to((root / "images").resolve())
    def key(r):  # one question's apostrophe is mis-encoded differently in the two files: ASCII is compared
        return r.image.name, r.question.encode("ascii", "ignore").decode(), r.answer, r.answer_type

    for split in ("train", "test"):
        a, b = load_vqa_rad(root, split), load_vqa_rad(official, split)
        assert collections.Counter(map(key, a)) == collections.Counter(map(key, b))
    assert len(load_vqa_rad(official, "train")) == 3064


def test_real_slake_sample_english_only():
    root = shared_data("slake-sample")
    en, every = load_slake(root, "train"), load_slake(root, "train", lang="all")
    assert 0 < len(en) < len(every) == 147


def test_cli_error_is_one_line_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vqa.cli", "data", "stats", str(tmp_path / "none"),
                           "--format", "slake"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"medvqa data: error: {tmp_path / 'none'}: SLAKE folder not found"]


def test_carve_validation_by_question_keeps_images_in_both(phantom_dir):
    records = load_vqa_rad(phantom_dir / "vqa-rad", "train")
    train, val = carve_validation(records, 0.2, seed=1, by="question")
    assert len(train) + len(val) == len(records)
    assert abs(len(val) - 0.2 * len(records)) <= 1
    assert {image_key(r) for r in train} & {image_key(r) for r in val}
    with pytest.raises(DataError, match="expected 'image' or 'question'"):
        carve_validation(records, 0.2, by="patient")


def test_carve_validation_by_question_keeps_copies_of_a_question_together(phantom_dir):
    import dataclasses

    records = load_vqa_rad(phantom_dir / "vqa-rad", "train")
    # Each question again under another id, recased and respaced: a copy must land where its original does.
    copies = [dataclasses.replace(r, source_id=f"copy-{r.source_id}", question=" " + r.question.upper() + " ")
              for r in records]
    for seed in range(3):
        train, val = carve_validation(records + copies, 0.2, seed=seed, by="question")
        held = {(image_key(r), r.question.strip().lower()) for r in val}
        assert held and not held & {(image_key(r), r.question.strip().lower()) for r in train}
        assert 0.1 < len(val) / (2 * len(records)) < 0.3


def test_carve_validation_leaves_both_sides_a_question_or_refuses(phantom_dir):
    records = load_vqa_rad(phantom_dir / "vqa-rad", "train")
    one_image = [r for r in records if image_key(r) == image_key(records[0])]
    with pytest.raises(DataError, match="cannot carve a validation split from 1 image"):
        carve_validation(one_image, 0.1)  # else an empty validation: a traceback after the first epoch
    two_images = one_image + [r for r in records if image_key(r) != image_key(records[0])][:1]
    train, val = carve_validation(two_images, 0.9)  # 0.9 of 2 rounds to both: one stays to train on
    assert train and val and len(train) + len(val) == len(two_images)
