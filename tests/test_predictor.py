"""vqa.Predictor: every kind of image input, every input error, the result's contents."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ._bundle import ground_truth
from vqa.errors import DataError

QUESTION = "What imaging modality was used?"


@pytest.fixture(scope="module")
def sample(predictor_phantom):
    """A held-out phantom image (path) and its 8-bit gray pixels."""
    row = next(r for r in ground_truth(predictor_phantom) if r["kind"] == "modality")
    return row["image"], np.asarray(Image.open(row["image"]).convert("L"))


def test_import_vqa_stays_light():
    import subprocess
    import sys

    code = "import sys, vqa; assert 'torch' not in sys.modules; assert vqa.Predictor.__name__ == 'Predictor'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_result_contents(predictor, sample):
    p = predictor.predict(sample[0], f"  {QUESTION}  ", top_k=3)
    assert p.question == QUESTION
    assert p.answer == p.top_k[0][0] and p.score == p.top_k[0][1]
    assert 1 <= len(p.top_k) <= 3
    assert [s for _, s in p.top_k] == sorted((s for _, s in p.top_k), reverse=True)
    assert all(0.0 <= s <= 1.0 for _, s in p.top_k)
    assert p.score_kind == "sigmoid"  # QCR trains with BCE
    assert p.question_type in ("CLOSED", "OPEN") and p.question_type_source == "router"
    assert 0.5 <= p.question_type_score <= 1.0
    assert p.attention_grid.shape == predictor.grid_size == (4, 4)
    assert p.attention_grid.sum() == pytest.approx(1.0, abs=1e-4)
    heat = p.attention_map()
    assert heat.shape == (p.image.size[1], p.image.size[0]) and 0.0 <= heat.min() and 0.9 < heat.max() <= 1.0
    assert p.overlay().size == p.image.size and p.overlay().mode == "RGB"
    d = p.to_dict(attention=True)
    assert d["answer"] == p.answer and d["attention"]["grid_size"] == [4, 4] and len(d["top_k"]) == len(p.top_k)


def test_closed_question_is_routed_closed(predictor, sample):
    p = predictor.predict(sample[0], "Is there a lesion?")
    assert p.question_type == "CLOSED"
    assert {a for a, _ in p.top_k} <= {"yes", "no"}  # the closed branch answers only closed answers


@pytest.mark.parametrize("kind", ["path", "str", "pil_gray", "pil_rgb", "pil_rgba", "uint8", "uint16",
                                  "float", "channels_first"])
def test_image_kinds_give_the_same_answer(predictor, sample, kind):
    path, gray = sample
    expected = predictor.predict(path, QUESTION).answer
    wide = gray.astype(np.uint16) * 257  # the same picture, stretched over 16 bits
    rgba = np.dstack([gray, gray, gray, np.full_like(gray, 255)])
    image = {"path": path, "str": str(path), "pil_gray": Image.fromarray(gray), "uint8": gray,
             "pil_rgb": Image.fromarray(gray).convert("RGB"), "pil_rgba": Image.fromarray(rgba, "RGBA"),
             "uint16": wide, "float": gray.astype(np.float32) / 255.0,
             "channels_first": np.stack([gray] * 3)}[kind]
    p = predictor.predict(image, QUESTION)
    assert p.answer == expected
    assert p.image.mode in ("L", "RGB")


def test_16bit_png_file(predictor, sample, tmp_path):
    path = tmp_path / "wide.png"
    Image.fromarray(sample[1].astype(np.uint16) * 64).save(path)  # 14-bit data in 16 bits (mode I;16)
    assert Image.open(path).mode.startswith("I")
    p = predictor.predict(path, QUESTION)
    assert p.answer == predictor.predict(sample[0], QUESTION).answer
    assert np.asarray(p.image).max() == 255  # stretched, not divided by 65535 into black


def test_dicom(predictor):
    pydicom = pytest.importorskip("pydicom")
    path = pydicom.data.get_testdata_file("CT_small.dcm")
    p = predictor.predict(path, QUESTION)
    assert p.answer and p.image.size == (128, 128)


def test_huge_image_is_downscaled(predictor, sample):
    big = Image.fromarray(sample[1]).resize((5000, 3000))
    p = predictor.predict(big, QUESTION)
    assert max(p.image.size) == 2048 and any("downscaled from 5000x3000" in w for w in p.warnings)


def test_unknown_and_long_questions_warn(predictor, sample):
    p = predictor.predict(sample[0], "What zyxwv modality was used here in this image taken at the hospital today?")
    assert any("zyxwv" in w for w in p.warnings)
    assert any("reads the first" in w for w in p.warnings)


@pytest.mark.parametrize("question, message", [
    ("", "empty"), ("   \n ", "empty"), ("x" * 2000, "2,000 characters"), ("?!", "no words"), (None, "text"),
])
def test_bad_questions(predictor, sample, question, message):
    with pytest.raises(DataError, match=message):
        predictor.predict(sample[0], question)


def test_bad_images(predictor, tmp_path):
    not_image = tmp_path / "notes.txt"
    not_image.write_text("this is not an image")
    truncated = tmp_path / "cut.png"
    buf = tmp_path / "full.png"
    Image.new("L", (64, 64), 128).save(buf)
    truncated.write_bytes(buf.read_bytes()[:60])
    fake_dicom = tmp_path / "scan.dcm"
    fake_dicom.write_bytes(b"\0" * 200)
    cases = [(None, "no image"), (tmp_path / "missing.png", "missing.png"), (not_image, "notes.txt"),
             (truncated, "cut.png"), (fake_dicom, "scan.dcm"), (np.zeros((2, 3, 4, 5)), "shape"), (42, "int")]
    for image, message in cases:
        with pytest.raises(DataError, match=message):
            predictor.predict(image, QUESTION)


def test_batch_matches_single_and_names_bad_items(predictor, predictor_phantom):
    rows = ground_truth(predictor_phantom)[:12]  # 8 questions per image: images repeat
    batch = predictor.predict_batch([r["image"] for r in rows], [r["question"] for r in rows], batch_size=5)
    assert len(batch) == len(rows)
    assert predictor.predict_batch([], []) == []  # nothing asked, nothing answered
    for r, p in zip(rows, batch):
        single = predictor.predict(r["image"], r["question"])
        assert p.answer == single.answer
        assert p.top_k[0][1] == pytest.approx(single.top_k[0][1], abs=1e-5)
    with pytest.raises(DataError, match="item 1: the question is empty"):
        predictor.predict_batch([rows[0]["image"]] * 2, ["Is there a lesion?", ""])
    with pytest.raises(DataError, match="2 images but 1 questions"):
        predictor.predict_batch([rows[0]["image"]] * 2, ["Is there a lesion?"])


def test_from_bundle_errors(tmp_path):
    from vqa import Predictor

    with pytest.raises(DataError, match="bundle folder not found"):
        Predictor.from_bundle(tmp_path / "nope")


def _train_tiny(phantom, out, **kw):
    import torch

    from vqa.train import TrainConfig, train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(TrainConfig(encoder="clip-vit-tiny", embed_dim=16, question_dim=32, epochs=1, device="cpu",
                                 out=str(out), cache_dir=str(out / "features"), progress=False, **kw))
    finally:
        torch.set_num_threads(threads)


def test_head_without_router_types_from_answer(predictor_phantom, tmp_path, sample):
    from vqa import Predictor

    bundle = _train_tiny(predictor_phantom, tmp_path, data=str(predictor_phantom / "vqa-rad"), head="mevf-ban",
                         head_args={"hidden_dim": 32, "glimpses": 1})
    mevf = Predictor.from_bundle(bundle)
    p = mevf.predict(sample[0], "Is there a lesion?")
    with pytest.raises(DataError, match="takes no choices"):
        mevf.predict(sample[0], "Is there a lesion?", choices=["yes", "no"])
    assert p.question_type_source == "answer" and p.question_type_score is None
    assert p.question_type == ("CLOSED" if p.answer in ("yes", "no") else "OPEN")
    assert p.score_kind == "sigmoid" and p.attention_grid.shape == (4, 4)


def test_multiple_choice_head(predictor_phantom, tmp_path, sample):
    from vqa import Predictor

    bundle = _train_tiny(predictor_phantom, tmp_path, format="pmc-vqa", data=str(predictor_phantom / "pmc-vqa"),
                         head="mc-ban", head_args={"hidden_dim": 32, "glimpses": 1})
    mc = Predictor.from_bundle(bundle)
    choices = ["ct", "mri", "x-ray"]
    p = mc.predict(sample[0], "What imaging modality was used?", choices=choices)
    assert p.score_kind == "softmax" and p.answer in choices and len(p.top_k) == 3
    assert sum(s for _, s in p.top_k) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(DataError, match="pass choices"):
        mc.predict(sample[0], "What imaging modality was used?")
    # choices as a user types them read as the records' normalised ones (training and eval encode those); the
    # user's own text is what comes back
    typed = ["The CT", "MRI:", "an X-ray"]
    q = mc.predict(sample[0], "What imaging modality was used?", choices=typed, top_k=3)
    assert q.answer == typed[choices.index(p.answer)]
    assert [s for _, s in q.top_k] == pytest.approx([s for _, s in p.top_k], abs=1e-6)
    assert [typed[choices.index(a)] for a, _ in p.top_k] == [a for a, _ in q.top_k]
    for bad in (["A", "B", "C"], ["CT", "the CT", "MRI"]):  # "a" is an article: nothing left; two read as "ct"
        with pytest.raises(DataError, match="each must keep a word and differ from the others"):
            mc.predict(sample[0], "What imaging modality was used?", choices=bad)
    # in a batch file such a row fails alone, named by its line; the rows beside it are answered
    import io
    import json

    from vqa.cli.predict import run_batch

    rows = [{"image": str(sample[0]), "question": "What imaging modality was used?", "choices": c}
            for c in (choices, ["A", "B", "C"], typed)]
    (tmp_path / "batch.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sink = io.StringIO()
    assert run_batch(mc, tmp_path / "batch.jsonl", sink, top_k=1, batch_size=8, attention=False) == (2, 1)
    written = [json.loads(line) for line in sink.getvalue().splitlines()]
    assert [w["line"] for w in written] == [1, 2, 3] and "each must keep a word" in written[1]["error"]
    assert written[0]["answer"] == p.answer and written[2]["answer"] == q.answer
    from vqa.evaluate import evaluate  # a head and questions that do not fit: said so, not a TypeError deep inside

    with pytest.raises(DataError, match=r"open-ended \(no choices\), but the bundle's head \(mc-ban\) picks among"):
        evaluate(bundle, "vqa-rad", str(predictor_phantom / "vqa-rad"), device="cpu", progress=False,
                 cache_dir=str(tmp_path / "cache"))


def test_scores_follow_the_training_loss(trained_bundle, sample, tmp_path):
    # A head trained with softmax cross-entropy (--loss ce) gets softmax scores; same weights, same answer.
    import json
    import shutil

    from vqa import Predictor

    ce = tmp_path / "bundle-ce"
    shutil.copytree(trained_bundle, ce)
    config = json.loads((ce / "config.json").read_text())
    assert config["training"]["loss"] == "bce"
    config["training"]["loss"] = "ce"
    (ce / "config.json").write_text(json.dumps(config))
    bce, softmax = (Predictor.from_bundle(b).predict(sample[0], QUESTION, top_k=50) for b in (trained_bundle, ce))
    assert softmax.score_kind == "softmax" and bce.score_kind == "sigmoid"
    assert softmax.answer == bce.answer
    routed = [s for _, s in softmax.top_k if s >= 0]  # answers the router's branch allows
    assert sum(routed) == pytest.approx(1.0, abs=1e-4)
    assert [a for a, _ in softmax.top_k] == [a for a, _ in bce.top_k]  # both monotonic in the logits
