"""The Gradio app: its handlers (every input error shown, never raised) and its API through gradio_client.

`launched_demo` (the app served on a free localhost port, once per session) is
shared with test_demo_browser.py.
"""
from __future__ import annotations


import numpy as np
import pytest
from PIL import Image

from ._bundle import known_answer

pytest.importorskip("gradio")
def test_build_demo_without_launch(predictor, demo_examples):
    import gradio as gr

    from demos.app import build_demo

    demo = build_demo(predictor, examples=demo_examples)
    assert isinstance(demo, gr.Blocks)
    assert "/ask" in {f"/{d.api_name}" for d in demo.fns.values() if d.api_name}


def test_the_demo_says_how_its_model_scores(predictor):
    from demos.app import _model_card

    text = _model_card(predictor)  # the test bundle: a QCR head trained with BCE, validation per type
    assert "sigmoid per answer" in text and "% closed, " in text
    predictor.score_kind = "softmax"  # a head trained with --loss ce: over its vocabulary, not over choices
    try:
        assert f"softmax over its {len(predictor.answers)} answers" in _model_card(predictor)
    finally:
        predictor.score_kind = "sigmoid"


def test_a_multiple_choice_bundle_is_refused_by_the_demo(predictor_phantom, tmp_path):
    from demos.app import build_demo
    from vqa import Predictor
    from vqa.errors import DataError
    from vqa.train import TrainConfig, train

    bundle = train(TrainConfig(format="pmc-vqa", data=str(predictor_phantom / "pmc-vqa"), encoder="clip-vit-tiny",
                               head="mc-ban", head_args={"hidden_dim": 16, "glimpses": 1}, embed_dim=8,
                               question_dim=16, epochs=1, device="cpu", progress=False, out=str(tmp_path / "run"),
                               cache_dir=str(tmp_path / "cache")))
    with pytest.raises(DataError, match="picks among given choices"):
        build_demo(Predictor.from_bundle(bundle), examples=[])


def test_answer_handler(predictor, predictor_phantom):
    from demos.app import answer_question

    row = known_answer(predictor, predictor_phantom)
    answer, qtype, chart, overlay, details, status = answer_question(predictor, str(row["image"]), row["question"])
    assert answer == row["answer"]
    assert qtype.startswith("open (type router")
    assert list(chart["answer"])[0] == answer and len(chart) <= 5
    assert overlay.size == Image.open(row["image"]).size
    assert details["answer"] == answer and details["attention"]["grid_size"] == [4, 4]
    assert status.startswith("Answered in")


def test_reference_answer_for_an_example_copy(predictor, predictor_phantom, tmp_path):
    """An example image, even as the copy Gradio serves, asked one of its questions shows the dataset's answer."""
    import shutil

    from demos.app import ReferenceAnswers, answer_question
    from demos.examples import Example

    row = known_answer(predictor, predictor_phantom)
    references = ReferenceAnswers([Example(row["image"], "example", {row["question"]: row["answer"]})])
    copy = tmp_path / "served.jpg"
    shutil.copy(row["image"], copy)
    reference = references.lookup(str(copy), row["question"].upper() + " ")
    assert reference == row["answer"]
    assert references.lookup(str(copy), "Is there a lesion in the other lung?") is None
    (tmp_path / "other.jpg").write_bytes(copy.read_bytes() + b"\0")
    assert references.lookup(str(tmp_path / "other.jpg"), row["question"]) is None  # other bytes, no reference
    status = answer_question(predictor, str(copy), row["question"], reference)[-1]
    assert status.endswith(f"Reference answer (the example's dataset): {row['answer']!r}.")


@pytest.mark.parametrize("case", ["no image", "not an image", "empty question", "long question"])
def test_answer_handler_errors(predictor, predictor_phantom, tmp_path, case):
    from demos.app import answer_question

    image = str(known_answer(predictor, predictor_phantom)["image"])
    question = "Is there a lesion?"
    if case == "no image":
        image = None
    elif case == "not an image":
        image = str(tmp_path / "report.pdf")
        (tmp_path / "report.pdf").write_bytes(b"%PDF-1.4 not an image")
    elif case == "empty question":
        question = "   "
    else:
        question = "Is there a lesion? " * 106  # 2,000+ characters
    with pytest.warns(UserWarning):  # gr.Warning outside a request is a UserWarning
        out = answer_question(predictor, image, question)
    answer, _, chart, overlay, details, status = out
    assert answer == "" and chart is None and overlay is None and details is None
    expected = {"no image": "no image", "not an image": "report.pdf", "empty question": "empty",
                "long question": "characters long"}[case]
    assert status.startswith("Error:") and expected in status


@pytest.mark.parametrize("mode", ["I;16", "RGBA", "L", "huge"])
def test_preview_converts_images(tmp_path, mode):
    from demos.app import show_image

    gray = (np.arange(64 * 64).reshape(64, 64) % 251).astype(np.uint8)
    if mode == "I;16":
        img = Image.fromarray(gray.astype(np.uint16) * 200)  # mode I;16
    elif mode == "RGBA":
        img = Image.fromarray(np.dstack([gray] * 3 + [np.full_like(gray, 200)]), "RGBA")
    elif mode == "huge":
        img = Image.fromarray(gray).resize((4096, 2500))
    else:
        img = Image.fromarray(gray)
    path = tmp_path / "img.png"
    img.save(path)
    view, status = show_image(str(path))
    assert view.mode in ("L", "RGB") and "ready" in status
    if mode == "huge":
        assert max(view.size) == 2048 and "downscaled" in status


def test_api_with_gradio_client(launched_demo, predictor, predictor_phantom):
    from gradio_client import Client, handle_file

    row = known_answer(predictor, predictor_phantom)
    client = Client(launched_demo[1], verbose=False)
    answer, qtype, _chart, _overlay, details, status = client.predict(
        handle_file(str(row["image"])), row["question"], api_name="/ask")
    assert answer == row["answer"]
    assert qtype.startswith("open") and details["answer"] == answer and status.startswith("Answered")
    # An input error comes back as a status, not as an exception.
    answer, *_, status = client.predict(handle_file(str(row["image"])), "", api_name="/ask")
    assert answer == "" and "empty" in status
