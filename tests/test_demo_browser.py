"""The demo in a real browser: headless Debian Chromium driven by Playwright.

Uploads a held-out phantom image, asks a question the test bundle answers
correctly, reads the answer off the page, checks the error path, and saves a
screenshot (its path is printed; run pytest with -s to see it).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from ._bundle import known_answer

CHROMIUM = os.environ.get("MEDVQA_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 60_000  # generous: the 2 shared CPU cores may be busy

pytestmark = pytest.mark.slow  # a browser per module: end to end, left out of the fast lane


@pytest.fixture(scope="module")
def page():
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        yield page
        browser.close()


def _ask(page, question: str) -> None:
    page.locator("#question textarea").fill(question)
    page.locator("#ask").click()


def test_answer_in_browser(page, launched_demo, predictor, predictor_phantom, tmp_path_factory):
    from playwright.sync_api import expect

    row = known_answer(predictor, predictor_phantom)  # a held-out modality question the bundle gets right
    page.goto(launched_demo[1])
    page.locator("#image input[type=file]").set_input_files(str(row["image"]))
    expect(page.locator("#status textarea")).to_have_value("Image 256x256 (L) ready: ask a question.")
    _ask(page, row["question"])
    expect(page.locator("#answer textarea")).to_have_value(row["answer"])
    expect(page.locator("#qtype textarea")).to_have_value(
        re.compile(r"^open \(type router, \d+%\)$"))
    expect(page.locator("#status textarea")).to_have_value(re.compile(r"^Answered in \d+ ms"))
    expect(page.locator("#view img")).to_be_visible()
    expect(page.locator("#top5 svg")).to_contain_text(row["answer"])  # the bar chart drew the top answers
    shot = tmp_path_factory.mktemp("screenshots") / "demo-answer.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"\nscreenshot: {shot}")
    assert shot.stat().st_size > 10_000

    # An input error is shown in the page, and the page keeps working afterwards.
    _ask(page, "x" * 2000)
    expect(page.locator("#status textarea")).to_have_value(re.compile("characters long"))
    expect(page.locator("#answer textarea")).to_have_value("")
    _ask(page, row["question"])
    expect(page.locator("#answer textarea")).to_have_value(row["answer"])


def test_example_gallery_and_bad_upload_in_browser(page, launched_demo, tmp_path):
    from playwright.sync_api import expect

    page.goto(launched_demo[1])
    page.locator("#examples button.thumbnail-item").first.click()
    expect(page.locator("#status textarea")).to_have_value(re.compile("ready: ask a question"))
    # a question phantom training asks (of this image too): the seconds-trained test model answers it above its threshold
    # (an off-template one may be "not sure", which test_not_sure_in_browser covers)
    _ask(page, "Is this a normal study?")
    expect(page.locator("#answer textarea")).to_have_value(re.compile("^(yes|no)$"))
    expect(page.locator("#qtype textarea")).to_have_value(re.compile("^closed"))

    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    page.locator("#image button[aria-label='Clear']").click()
    page.locator("#image input[type=file]").set_input_files(str(notes))
    expect(page.locator("#status textarea")).to_have_value(re.compile(r"^Error: .*notes\.txt"))
    _ask(page, "Is there a lesion?")
    expect(page.locator("#status textarea")).to_have_value(re.compile(r"^Error: .*notes\.txt"))
    expect(page.locator("#answer textarea")).to_have_value("")


def test_not_sure_in_browser(page, launched_demo, predictor, predictor_phantom):
    """A question the model cannot read (its words never seen in training) is answered "not sure", greyed."""
    from playwright.sync_api import expect

    row = known_answer(predictor, predictor_phantom)
    page.goto(launched_demo[1])
    page.locator("#image input[type=file]").set_input_files(str(row["image"]))
    expect(page.locator("#status textarea")).to_have_value(re.compile("ready: ask a question"))
    _ask(page, "Zorblat quinx fremmel wobbly?")
    expect(page.locator("#answer textarea")).to_have_value("not sure")
    expect(page.locator("#status textarea")).to_have_value(re.compile(r"^Not sure .*unknown to the model.*best guess"))
    _ask(page, row["question"])  # a question it reads: a plain answer again
    expect(page.locator("#answer textarea")).to_have_value(row["answer"])


def test_shipped_model_in_browser(page):
    """`medvqa demo`'s default: the shipped VQA-RAD model answers a real example image as the Predictor does, with
    the example's reference answer beside it (its vocabulary is VQA-RAD's: tests/test_shipped_model.py)."""
    import json

    from playwright.sync_api import expect

    from demos.app import build_demo, default_examples
    from demos.shipped_model import SHIPPED_BUNDLE
    from vqa import Predictor

    from .conftest import free_port

    if not (SHIPPED_BUNDLE / "config.json").is_file():
        pytest.skip(f"{SHIPPED_BUNDLE}: no shipped model in this checkout")
    predictor = Predictor.from_bundle(SHIPPED_BUNDLE)
    examples, questions = default_examples()
    real = [e for e in examples if e.caption.startswith("VQA-RAD")]
    # The first real example question answered without abstaining, and not by yes/no.
    chosen = None
    for index, example in enumerate(examples):
        if example in real:
            for question, reference in example.answers.items():
                p = predictor.predict(str(example.path), question)
                if not p.abstained and p.answer not in ("yes", "no"):
                    chosen = index, question, reference, p.answer
                    break
        if chosen:
            break
    assert chosen, "no confident open answer on the shipped examples"
    index, question, reference, answer = chosen
    assert answer in json.loads((SHIPPED_BUNDLE / "answers.json").read_text())["answers"]

    demo = build_demo(predictor)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        page.goto(f"http://127.0.0.1:{port}/")
        expect(page.locator("#examples button.thumbnail-item")).to_have_count(len(examples))
        page.locator("#examples button.thumbnail-item").nth(index).click()
        expect(page.locator("#status textarea")).to_have_value(re.compile("ready: ask a question"))
        _ask(page, question)
        expect(page.locator("#answer textarea")).to_have_value(answer)
        expect(page.locator("#status textarea")).to_have_value(
            re.compile(r"Reference answer \(the example's dataset\): " + re.escape(repr(reference))))
    finally:
        demo.close()
