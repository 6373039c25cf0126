"""The Gradio app over a `vqa.Predictor`: an image and a question in, the answer and why out.

    from demos.app import build_demo
    demo = build_demo(Predictor.from_bundle(path))   # a gr.Blocks; tests use it without launch()
    demo.launch(server_name="127.0.0.1", server_port=7860)

Every input error (no image, a file that is not an image, an empty or too long
question) is shown in the page as a warning and in the status box; the app never
raises into Gradio. The answer endpoint is also an API: `/ask` (gradio_client).
"""

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Sequence

from .examples import QUESTIONS, Example, ensure_examples

log = logging.getLogger(__name__)

TITLE = "medvqa: ask a question about a radiology image"
NOT_SURE = "not sure"
CSS = "#answer textarea {font-size: 1.4em; font-weight: 600}"


def _model_card(predictor) -> str:
    info = predictor.describe()
    val = info["validation"]
    parts = ", ".join(f"{val[k]:.1%} {k}" for k in ("closed", "open") if val.get(k) is not None)
    accuracy = (f"; validation accuracy {val['overall']:.1%} overall" + (f" ({parts})" if parts else "")
                if val.get("overall") is not None else "")
    scores = ("sigmoid per answer: the head trains with binary cross-entropy, so scores do not sum to 1"
              if info["score_kind"] == "sigmoid" else f"softmax over its {info['answers']} answers")
    qtype = ("the model's question-type router" if info["question_type_from"] == "router"
             else "the answer (yes/no answers are closed)")
    if info["calibrated"]:
        trust = (" **Confidence** is calibrated on validation"
                 + (" and weighs whether the training questions nearest this one had the same answer (trust scores)"
                    if info.get("trust_scores") else "")
                 + f"; the model says *not sure* below the confidence at "
                 f"which its validation answers were wrong more than {info['target_risk']} of the time"
                 + (f", and for images unlike its training images (judged in the features of "
                    f"{info.get('out_of_scope_space') or 'its image encoder'})" if info["out_of_scope_detector"] else "")
                 + ", and for questions of mostly unknown words.")
    else:
        trust = " **Confidence**: uncalibrated (a bundle from before calibration); it never abstains."
    return (f"**Model**: `{info['encoder']}` image encoder + `{info['head']}` head, {info['answers']} answers"
            f"{accuracy}. **Scores**: {scores}. **Closed/open**: from {qtype}.{trust} "
            "A research demo: not for clinical use.")


def _message(error: Exception, image: Any) -> str:
    """The error as the user should read it: an uploaded file by its name, not the server's temp path."""
    text = str(error)
    if isinstance(image, (str, os.PathLike)):
        text = text.replace(str(Path(image).parent) + os.sep, "")
    return text


def answer_question(predictor, image: Any, question: str, reference: str | None = None) -> tuple:
    """(answer, question type, top-k table, heatmap, details, status); errors fill only the status.

    `reference`: the dataset's answer, for an example image asked one of its questions (shown in the status)."""
    import gradio as gr
    import pandas as pd

    from vqa.errors import DataError

    try:
        if image is None:
            raise DataError("no image: upload one or pick an example")
        p = predictor.predict(image, question, top_k=5)
    except DataError as e:
        gr.Warning(_message(e, image))
        return "", "", None, None, None, f"Error: {_message(e, image)}"
    except Exception as e:  # a bug, not the user's fault: say so, keep the app alive
        log.exception("prediction failed")
        gr.Warning(f"internal error: {e}")
        return "", "", None, None, None, f"Internal error: {type(e).__name__}: {e}"
    source = (f"type router, {p.question_type_score:.0%}" if p.question_type_source == "router"
              else "from the yes/no answer")
    state = NOT_SURE if p.abstained else "answer"
    chart = pd.DataFrame({"answer": [a for a, _ in p.top_k], "score": [s for _, s in p.top_k],
                          "state": [state] * len(p.top_k)})  # greyed bars when the model is not sure
    notes = "".join(f" Note: {w}." for w in p.warnings)
    if p.familiarity is not None:  # what the calibrated confidence read besides the model's scores
        notes += (f" Familiarity {p.familiarity:.0%}: the share of content words this question shares with the "
                  "closest one asked about this image in training" + (
                      ", which training answered as the model does" if p.agreement > 0 else
                      ", which training answered otherwise" if p.agreement < 0 else "") + ".")
    kind = "calibrated confidence" if p.calibrated else "uncalibrated score"
    if p.abstained:
        status = (f"Not sure (answered in {p.seconds * 1e3:.0f} ms): {p.abstain_reason}. The best guess, not to be "
                  f"relied on: {p.answer!r} ({kind} {p.confidence:.0%}).{notes}")
    else:
        status = f"Answered in {p.seconds * 1e3:.0f} ms ({kind} {p.confidence:.0%}).{notes}"
    if reference is not None:
        status += f" Reference answer (the example's dataset): {reference!r}."
    return (NOT_SURE if p.abstained else p.answer, f"{p.question_type.lower()} ({source})", chart, p.overlay(),
            p.to_dict(attention=True), status)


def _file_digest(path: Any) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except (TypeError, OSError):
        return None


class ReferenceAnswers:
    """The examples' known answers, found by the picked file's content (Gradio serves a copy, not the path)."""

    def __init__(self, examples: Sequence[Example]):
        self._by_digest = {_file_digest(e.path): {_key(q): a for q, a in e.answers.items()}
                           for e in examples if e.answers}

    def lookup(self, image: Any, question: str) -> str | None:
        if not self._by_digest or not isinstance(image, (str, os.PathLike)):
            return None
        return self._by_digest.get(_file_digest(image), {}).get(_key(question or ""))


def _key(question: str) -> str:
    return " ".join(question.lower().split()).rstrip("?")


def show_image(image: Any) -> tuple:
    """Preview an uploaded file as the model will see it (8-bit, downscaled), or say why it cannot."""
    import gradio as gr

    from vqa.errors import DataError
    from vqa.predictor import read_image

    if image is None:
        return None, ""
    try:
        loaded = read_image(image)
    except DataError as e:
        gr.Warning(_message(e, image))
        return None, f"Error: {_message(e, image)}"
    w, h = loaded.image.size
    notes = "".join(f" Note: {n}." for n in loaded.warnings)
    return loaded.image, f"Image {w}x{h} ({loaded.image.mode}) ready: ask a question.{notes}"


def default_examples() -> tuple[list[Example], list[str]]:
    """The shipped VQA-RAD test images (CC0) with their real questions first, then held-out phantom images."""
    from .shipped_model import shipped_examples

    real = [Example(Path(r["path"]), f"VQA-RAD · {r['organ']}", {q["question"]: q["answer"] for q in r["questions"]})
            for r in shipped_examples()]
    questions = list(dict.fromkeys([q for e in real for q in e.answers] + list(QUESTIONS)))
    return real + ensure_examples(), questions


def build_demo(predictor, examples: Sequence[Example] | None = None, questions: Sequence[str] | None = None):
    """The demo as a `gr.Blocks` (not launched). `examples` default to the shipped VQA-RAD test images and
    cached held-out phantom images; `questions` to theirs."""
    import gradio as gr

    from vqa.errors import DataError

    if predictor.runtime.needs_choices:  # the page has no field for them: every question would fail
        raise DataError(f"{predictor.path}: its head ({predictor.runtime.head_name}) picks among given choices; the "
                        "demo answers from a vocabulary: ask it with `medvqa predict --choices ...`")
    if examples is None:
        examples, default_questions = default_examples()
        questions = questions or default_questions
    examples, questions = list(examples), list(questions or QUESTIONS)
    # uploads, previews and heatmaps are files in Gradio's cache: an hour old, they are deleted (hourly), else a
    # long-running demo fills its disk with every DICOM ever uploaded
    with gr.Blocks(title="medvqa demo", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(f"# {TITLE}\n{_model_card(predictor)}")
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.File(label="Image (PNG, JPEG, TIFF incl. 16-bit, DICOM)", type="filepath",
                                elem_id="image", height=120)
                gallery = gr.Gallery(value=[(str(e.path), e.caption) for e in examples], label="…or pick an example",
                                     columns=4, height=300, allow_preview=False, interactive=False,
                                     elem_id="examples")
                question = gr.Textbox(label="Question", placeholder=questions[0], lines=1, elem_id="question")
                gr.Examples([[q] for q in questions], inputs=[question], label="Example questions")
                ask = gr.Button("Ask", variant="primary", elem_id="ask")
            with gr.Column(scale=1):
                answer = gr.Textbox(label="Answer", interactive=False, elem_id="answer")
                qtype = gr.Textbox(label="Question type (closed / open)", interactive=False, elem_id="qtype")
                # No initial DataFrame: an empty one would fix the x axis as numeric. No fixed
                # height: with one, the answer labels under the bars are cut off.
                chart = gr.BarPlot(None, x="answer", y="score", sort="-y", y_lim=[0, 1], color="state",
                                   color_map={"answer": "#4c72b0", NOT_SURE: "#bbbbbb"},
                                   y_title=f"score ({predictor.score_kind})", label="Top-5 answers",
                                   elem_id="top5")
                view = gr.Image(label="Image, with the model's attention after an answer", type="pil",
                                interactive=False, elem_id="view", height=320)
                status = gr.Textbox(label="Status", interactive=False, elem_id="status")
                with gr.Accordion("Details (JSON)", open=False):
                    details = gr.JSON(elem_id="details")

        def pick(gallery_value: list, evt: gr.SelectData) -> str:
            item = gallery_value[evt.index]
            path = item[0] if isinstance(item, (list, tuple)) else item
            return path if isinstance(path, str) else getattr(path, "path", str(path))

        references = ReferenceAnswers(examples)

        def ask_fn(image_value, question_value):
            return answer_question(predictor, image_value, question_value,
                                   references.lookup(image_value, question_value))

        gallery.select(pick, inputs=[gallery], outputs=[image], api_name=False)
        image.change(show_image, inputs=[image], outputs=[view, status], api_name=False)
        outputs = [answer, qtype, chart, view, details, status]
        ask.click(ask_fn, inputs=[image, question], outputs=outputs, api_name="ask")
        question.submit(ask_fn, inputs=[image, question], outputs=outputs, api_name=False)
    return demo


MAX_UPLOAD_MB = 200  # a multi-frame DICOM series fits; larger uploads are refused by Gradio before they land


def launch(demo, host: str = "127.0.0.1", port: int | None = None, max_upload_mb: int = MAX_UPLOAD_MB, **kw: Any):
    """Launch with the settings that work offline; returns what `gr.Blocks.launch` returns.

    Uploads above `max_upload_mb` are refused; an image within it still has to pass the pixel
    bound of `encoders.load_image` before it is decoded."""
    import gradio as gr

    return demo.launch(server_name=host, server_port=port, theme=gr.themes.Soft(), css=CSS,
                       max_file_size=f"{max_upload_mb}mb", footer_links=["api", "gradio"], **kw)

