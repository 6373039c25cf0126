"""PathVQA: the released layout (pickled question lists, images/{split}/), the hub copy's Parquet, the restricted
unpickler, and the open-answer metrics (exact match; LLaVA-Med's token recall) through `medvqa eval`."""
from __future__ import annotations

import logging
import os
import pickle
import shutil
from collections import Counter

import pytest

from vqa.data import FORMATS, load_records
from vqa.data.pathvqa import load_pathvqa
from vqa.errors import DataError
from vqa.metrics import token_recall, vqa_metrics
from vqa.text import normalize_answer

SPLITS = {"train": "train", "validate": "val", "test": "test"}


def _truth(phantom_truth, split: str) -> list[dict]:
    return [qa for t in phantom_truth if SPLITS[t["split"]] == split for qa in t["qa"]]


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_released_layout_round_trips_the_phantom_export(phantom_dir, phantom_truth, split):
    records = load_records("pathvqa", phantom_dir / "pathvqa", split)
    truth = _truth(phantom_truth, split)
    assert len(records) == len(truth) > 0
    by_id = {str(qa["qid"]): qa for qa in truth}
    for r in records:
        qa = by_id[r.source_id]
        assert (r.question, r.answer, r.answer_type) == (qa["question"], qa["answer"], qa["answer_type"])
        assert r.image.parent == phantom_dir / "pathvqa" / "images" / split and r.image.name.startswith(f"{split}_")
        assert r.dataset == "pathvqa" and r.split == split
    # one image file per phantom image of the split, each with its 8 questions
    assert len({r.image for r in records}) == sum(SPLITS[t["split"]] == split for t in phantom_truth)
    assert FORMATS["pathvqa"].validation_split == "val"


def test_released_records_have_pathvqa_fields(phantom_dir):
    items = pickle.loads((phantom_dir / "pathvqa" / "qas" / "train_vqa.pkl").read_bytes())
    assert {"img_id", "sent", "label", "answer_type", "question_id", "question_type"} <= set(items[0])
    assert {i["answer_type"] for i in items} == {"yes/no", "other"}
    qa = pickle.loads((phantom_dir / "pathvqa" / "qas" / "train" / "train_qa.pkl").read_bytes())
    assert set(qa[0]) == {"image", "question", "answer"} and len(qa) == len(items)


def test_qa_pickles_without_answer_type_infer_it_with_a_warning(phantom_dir, tmp_path, caplog):
    root = tmp_path / "pvqa"
    shutil.copytree(phantom_dir / "pathvqa", root)
    (root / "qas" / "test_vqa.pkl").unlink()  # only qas/test/test_qa.pkl is left
    with caplog.at_level(logging.WARNING):
        records = load_pathvqa(root, "test")
    assert "no answer_type" in caplog.text and "inferred" in caplog.text
    released = load_pathvqa(phantom_dir / "pathvqa", "test")
    assert [(r.question, r.answer, r.answer_type) for r in records] == \
        [(r.question, r.answer, r.answer_type) for r in released]  # the phantom's closed questions are yes/no


class _Shell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_restricted_unpickler_refuses_a_foreign_global(phantom_dir, tmp_path):
    root = tmp_path / "pvqa"
    shutil.copytree(phantom_dir / "pathvqa", root)
    marker = tmp_path / "ran"
    items = pickle.loads((root / "qas" / "val_vqa.pkl").read_bytes())
    items[0]["sent"] = _Shell(marker)
    (root / "qas" / "val_vqa.pkl").write_bytes(pickle.dumps(items))
    with pytest.raises(DataError, match=r"val_vqa\.pkl: refusing to unpickle global '(posix|os|nt)\.system'"):
        load_pathvqa(root, "val")
    assert not marker.exists()  # nothing in the file ran


def test_restricted_unpickler_allows_builtins_only(phantom_dir, tmp_path):
    import collections

    import numpy as np

    root = tmp_path / "pvqa"
    shutil.copytree(phantom_dir / "pathvqa", root)
    for foreign, name in ((np.float64(1.0), "numpy"), (collections.OrderedDict(a=1), "collections.OrderedDict")):
        items = pickle.loads((root / "qas" / "val_vqa.pkl").read_bytes())
        items[0]["label"] = {"yes": foreign}
        (root / "qas" / "val_vqa.pkl").write_bytes(pickle.dumps(items))
        with pytest.raises(DataError, match=f"refusing to unpickle global '{name}"):
            load_pathvqa(root, "val")


def test_bad_records_are_errors_naming_file_and_field(phantom_dir, tmp_path):
    root = tmp_path / "pvqa"
    shutil.copytree(phantom_dir / "pathvqa", root)
    path = root / "qas" / "val_vqa.pkl"
    good = pickle.loads(path.read_bytes())
    cases = [({"answer_type": "maybe"}, r"record 0: field 'answer_type' is 'maybe'"),
             ({"img_id": "val_9999"}, r"record 0: image 'val_9999.jpg' not found"),
             ({"label": {"yes": "high"}}, r"record 0: field 'label' should map answers to scores")]
    for change, message in cases:
        path.write_bytes(pickle.dumps([{**good[0], **change}, *good[1:]]))
        with pytest.raises(DataError, match=message):
            load_pathvqa(root, "val")
    path.write_bytes(pickle.dumps([{k: v for k, v in good[0].items() if k != "sent"}]))
    with pytest.raises(DataError, match=r"record 0: missing field 'sent' \(or 'question'\)"):
        load_pathvqa(root, "val")
    path.write_bytes(pickle.dumps({"not": "a list"}))
    with pytest.raises(DataError, match="expected a pickled list"):
        load_pathvqa(root, "val")
    with pytest.raises(DataError, match="not a PathVQA folder"):
        load_pathvqa(tmp_path, "val")
    with pytest.raises(DataError, match="split 'dev' unknown"):
        load_pathvqa(root, "dev")


def test_hub_parquet_copy_infers_closed_open_with_a_warning(phantom_dir, tmp_path, caplog):
    """The hub copy (flaviagiammarino/path-vqa): data/{train,validation,test}-*.parquet with image, question, answer."""
    datasets = pytest.importorskip("datasets")
    released = {s: load_pathvqa(phantom_dir / "pathvqa", s) for s in ("val", "test")}
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string")})
    for split, hub in (("val", "validation"), ("test", "test")):
        rows = {"image": [str(r.image) for r in released[split]], "question": [r.question for r in released[split]],
                "answer": [r.answer for r in released[split]]}
        (tmp_path / "hub" / "data").mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_dict(rows, features=features).to_parquet(
            str(tmp_path / "hub" / "data" / f"{hub}-00000-of-00001.parquet"))
    with caplog.at_level(logging.WARNING):
        records = load_pathvqa(tmp_path / "hub", "val")
    assert "no answer_type" in caplog.text
    assert [(r.question, r.answer, r.answer_type) for r in records] == \
        [(r.question, r.answer, r.answer_type) for r in released["val"]]
    assert records[0].dataset == "pathvqa" and records[0].image.size == (256, 256)  # decoded from the parquet bytes


def test_token_recall_is_the_share_of_reference_words_found():
    assert token_recall("a large mass", "mass") == 1.0
    assert token_recall("mass", "large mass") == 0.5
    assert token_recall("cyst", "mass") == 0.0
    assert token_recall("", "") == 1.0


def test_open_token_recall_in_the_metrics(phantom_dir):
    records = load_pathvqa(phantom_dir / "pathvqa", "test")
    answers = [r.answer if r.answer_type == "CLOSED" else f"{r.answer} lesion" for r in records]
    m = vqa_metrics(records, answers)
    assert m["open"] == 0.0 and m["open_token_recall"] == 1.0 and m["closed"] == 1.0
    counts = Counter(r.answer_type for r in records)
    assert m["n_open"] == counts["OPEN"] and normalize_answer("Yes") == "yes"


def test_train_and_eval_on_pathvqa(phantom_dir, tmp_path):
    """`medvqa train --format pathvqa` selects on PathVQA's val split; `medvqa eval` reports exact match and
    token recall for open answers."""
    from vqa.cli.eval import main as eval_main
    from vqa.train import TrainConfig, train

    cfg = TrainConfig(format="pathvqa", data=str(phantom_dir / "pathvqa"), encoder="clip-vit-tiny", head="mevf-ban",
                      head_args={"hidden_dim": 32, "glimpses": 1}, embed_dim=32, question_dim=32, epochs=2,
                      batch_size=32, out=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), progress=False)
    bundle = train(cfg)
    import json

    metrics = json.loads((bundle / "metrics.json").read_text())
    assert metrics["protocol"]["validation"] == "split 'val'"
    assert eval_main(["--bundle", str(bundle), "--format", "pathvqa", "--data", cfg.data, "--cache-dir",
                      cfg.cache_dir, "--out", str(tmp_path / "eval"), "--no-progress", "--threads", "1"]) == 0
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    m = report["subsets"]["all"]
    assert m["n"] == len(load_pathvqa(phantom_dir / "pathvqa", "test")) and 0 <= m["open_token_recall"] <= 1
    assert "token recall (LLaVA-Med" in (tmp_path / "eval" / "report.md").read_text()
