"""Classification data: MedMNIST .npz, ImageFolder and `datasets` read back the phantom's exports; MedMNIST's
label names from a sidecar, `--labels` or the medmnist package; the metrics are MedMNIST's."""
from __future__ import annotations

import io
import json
import logging
import sys
import types
import zipfile

import numpy as np
import pytest
from PIL import Image

from pretrain.classify import classification_metrics, majority_accuracy
from vqa.data.classification import (BINARY, MULTI_CLASS, MULTI_LABEL, load_classification, load_medmnist,
                                     medmnist_file)
from vqa.errors import DataError
from vqa.phantom.writers import CLASSIFICATION_TASKS, FINDINGS

SPLITS = {"train": "train", "validate": "val", "test": "test"}
LABEL_OF = {"modality": lambda s: s["modality"], "organ": lambda s: s["region"],
            "abnormal": lambda s: "abnormal" if s["abnormal"] else "normal"}


def _members(truth, split):
    return [t for t in truth if SPLITS[t["split"]] == split]  # the writers keep the phantom's image order


@pytest.mark.parametrize("task", sorted(CLASSIFICATION_TASKS))
@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_medmnist_npz_round_trips_the_phantom_labels(phantom_dir, phantom_truth, task, split):
    flag, names, _ = CLASSIFICATION_TASKS[task]
    data = load_classification("medmnist", phantom_dir / "classification" / "medmnist", split, flag=flag)
    members = _members(phantom_truth, split)
    assert data.label_names == names and data.task == (BINARY if len(names) == 2 else MULTI_CLASS)
    assert [names[i] for i in data.labels] == [LABEL_OF[task](t["scene"]) for t in members]
    first = np.asarray(Image.open(phantom_dir / "vqa-rad" / "images" / members[0]["file"]).convert("L")
                       .resize((64, 64), Image.Resampling.BICUBIC))
    assert data.images[0].dtype == np.uint8 and np.array_equal(data.images[0], first)
    assert data.name == flag and data.split == split


def test_multi_label_findings_as_chestmnist(phantom_dir, phantom_truth):
    data = load_medmnist(phantom_dir / "classification" / "medmnist" / "phantomfindingsmnist_64.npz", "test")
    assert data.task == MULTI_LABEL and data.label_names == FINDINGS and data.labels.shape == (len(data), 4)
    for row, t in zip(data.labels, _members(phantom_truth, "test")):
        s = t["scene"]
        assert row.tolist() == [s["lesion_kind"] == "mass", s["lesion_kind"] == "cyst", s["count"] > 1,
                                s["lesion_size"] == "large"]


@pytest.mark.parametrize("task", sorted(CLASSIFICATION_TASKS))
def test_image_folder_round_trips_the_phantom_labels(phantom_dir, phantom_truth, task):
    root = phantom_dir / "classification" / "imagefolder" / task
    npz = load_classification("medmnist", phantom_dir / "classification" / "medmnist", "val",
                              flag=CLASSIFICATION_TASKS[task][0])
    data = load_classification("imagefolder", root, "validate")  # validate/validation/val name one split
    assert data.label_names == tuple(sorted(CLASSIFICATION_TASKS[task][1]))
    truth = {t["file"]: LABEL_OF[task](t["scene"]) for t in _members(phantom_truth, "val")}
    assert {p.name: data.label_names[y] for p, y in zip(data.images, data.labels)} == truth
    assert sorted(data.label_names[y] for y in data.labels) == sorted(npz.label_names[y] for y in npz.labels)


def test_medmnist_folder_needs_flag_and_size_when_ambiguous(phantom_dir, tmp_path):
    folder = phantom_dir / "classification" / "medmnist"
    with pytest.raises(DataError, match="several MedMNIST sets .*pass --flag"):
        medmnist_file(folder)
    with pytest.raises(DataError, match="no pathmnist.npz"):
        medmnist_file(folder, "pathmnist")
    (tmp_path / "phantomorganmnist_64.npz").write_bytes((folder / "phantomorganmnist_64.npz").read_bytes())
    (tmp_path / "phantomorganmnist.npz").write_bytes((folder / "phantomorganmnist_64.npz").read_bytes())
    with pytest.raises(DataError, match=r"at several sizes \(\[28, 64\]\); pass --size"):
        medmnist_file(tmp_path)
    assert medmnist_file(tmp_path, size=64).name == "phantomorganmnist_64.npz"
    with pytest.raises(DataError, match="takes no --flag"):
        load_classification("imagefolder", tmp_path, "test", flag="x")


def _npz(path, **arrays) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path.write_bytes(buf.getvalue())


def test_label_names_from_labels_file_medmnist_info_or_ids(tmp_path, monkeypatch, caplog):
    images = np.zeros((4, 28, 28), np.uint8)
    _npz(tmp_path / "pathmnist.npz", test_images=images, test_labels=np.array([[0], [1], [2], [1]], np.uint8))
    monkeypatch.setitem(sys.modules, "medmnist", None)  # not installed
    with caplog.at_level(logging.WARNING):
        data = load_medmnist(tmp_path / "pathmnist.npz", "test")
    assert data.label_names == ("0", "1", "2") and data.task == MULTI_CLASS and "no label names" in caplog.text
    fake = types.ModuleType("medmnist")
    fake.INFO = {"pathmnist": {"task": "multi-class", "label": {"0": "adipose", "1": "background", "2": "debris"}}}
    monkeypatch.setitem(sys.modules, "medmnist", fake)
    assert load_medmnist(tmp_path / "pathmnist.npz", "test").label_names == ("adipose", "background", "debris")
    (tmp_path / "info.json").write_text(json.dumps({"pathmnist": {"task": "ordinal-regression",
                                                                  "label": {"0": "a", "1": "b", "2": "c"}}}))
    data = load_medmnist(tmp_path / "pathmnist.npz", "test", labels=tmp_path / "info.json")  # the whole INFO dict
    assert data.label_names == ("a", "b", "c") and data.task == "ordinal-regression"
    with pytest.raises(DataError, match="missing.json: file not found"):
        load_medmnist(tmp_path / "pathmnist.npz", "test", labels=tmp_path / "missing.json")


def test_bad_medmnist_files_are_errors_naming_file_and_array(tmp_path):
    path = tmp_path / "pathmnist.npz"
    _npz(path, train_images=np.zeros((2, 28, 28), np.uint8), train_labels=np.array([[0], [1]]))
    with pytest.raises(DataError, match=r"pathmnist.npz: no array 'test_images'"):
        load_medmnist(path, "test")
    _npz(path, test_images=np.zeros((2, 28, 28), np.float32), test_labels=np.array([[0], [1]]))
    with pytest.raises(DataError, match=r"'test_images' is float32 \(2, 28, 28\); expected uint8"):
        load_medmnist(path, "test")
    _npz(path, test_images=np.zeros((2, 28, 28), np.uint8), test_labels=np.array([[0], [1], [1]]))
    with pytest.raises(DataError, match=r"'test_labels' is int64 \(3, 1\)"):
        load_medmnist(path, "test")
    _npz(path, test_images=np.zeros((2, 28, 28), np.uint8), test_labels=np.array([[0], [7]]))
    (tmp_path / "pathmnist.json").write_text(json.dumps({"task": "multi-class", "label": {"0": "a", "1": "b"}}))
    with pytest.raises(DataError, match=r"one class id in 0..1 per image"):
        load_medmnist(path, "test")
    # object arrays would be pickles: never loaded
    with zipfile.ZipFile(path, "w") as zf:
        buf = io.BytesIO()
        np.lib.format.write_array(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        zf.writestr("test_images.npy", buf.getvalue())
        zf.writestr("test_labels.npy", buf.getvalue())
    with pytest.raises(DataError, match="not a readable MedMNIST .npz"):
        load_medmnist(path, "test")
    # a download cut short: the zip's directory at its end is missing
    _npz(path, test_images=np.zeros((2, 28, 28), np.uint8), test_labels=np.array([[0], [1]]))
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(DataError, match=r"pathmnist.*not a readable MedMNIST .npz \(File is not a zip file\)"):
        load_medmnist(path, "test")


def test_hf_classification_with_class_labels(phantom_dir, tmp_path):
    datasets = pytest.importorskip("datasets")
    data = load_classification("imagefolder", phantom_dir / "classification" / "imagefolder" / "organ", "test")
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=list(data.label_names))})
    ds = datasets.Dataset.from_dict({"image": [str(p) for p in data.images], "label": data.labels.tolist()},
                                    features=features)
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "organ"))
    back = load_classification("hf", tmp_path / "organ", "test")
    assert back.label_names == data.label_names and back.labels.tolist() == data.labels.tolist()
    assert back.images[0].size == (256, 256) and back.task == MULTI_CLASS


def test_metrics_follow_medmnist_definitions():
    from sklearn.metrics import roc_auc_score

    y = np.array([0, 1, 2, 1, 0, 2])
    s = np.array([[.7, .2, .1], [.1, .8, .1], [.3, .3, .4], [.5, .4, .1], [.6, .3, .1], [.2, .2, .6]])
    m = classification_metrics(y, s, MULTI_CLASS)
    assert m["accuracy"] == pytest.approx(5 / 6)
    assert m["auc"] == pytest.approx(np.mean([roc_auc_score(y == k, s[:, k]) for k in range(3)]))
    yb, sb = np.array([0, 1, 1, 0]), np.array([[.6, .4], [.3, .7], [.55, .45], [.2, .8]])
    mb = classification_metrics(yb, sb, BINARY)
    assert mb["accuracy"] == 0.5 and mb["auc"] == pytest.approx(roc_auc_score(yb, sb[:, 1]))
    yl = np.array([[1, 0], [0, 0], [1, 1], [0, 1]])
    sl = np.array([[.9, .2], [.4, .6], [.7, .8], [.2, .3]])
    ml = classification_metrics(yl, sl, MULTI_LABEL)
    assert ml["accuracy"] == pytest.approx(np.mean([1.0, 0.5]))  # label 0 all right; label 1: 2 of 4 at 0.5
    assert ml["auc"] == pytest.approx(np.mean([roc_auc_score(yl[:, j], sl[:, j]) for j in range(2)]))
    assert majority_accuracy(y, MULTI_CLASS) == pytest.approx(1 / 3)
    assert majority_accuracy(yl, MULTI_LABEL) == pytest.approx(0.5)
    one_class = classification_metrics(np.array([0, 0]), np.array([[.9, .1], [.8, .2]]), BINARY)
    assert one_class["auc"] is None and one_class["auc_classes"] == 0  # undefined, not a crash
