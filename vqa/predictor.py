"""Answer questions about images with a trained bundle.

    from vqa import Predictor
    predictor = Predictor.from_bundle("runs/demo/bundle")
    p = predictor.predict("scan.dcm", "What imaging modality was used?")
    p.answer, p.top_k, p.question_type, p.attention_map()    # str, [(answer, score)], "OPEN", (H, W)

Scores follow the training loss: a head trained with binary cross-entropy per
answer (MEVF and QCR's own, `--loss bce`) scores each answer with its sigmoid
(scores do not sum to 1); one trained with softmax cross-entropy (`--loss ce`,
and multiple-choice heads over their choices) gives a softmax.
`Prediction.score_kind` says which. The question type (CLOSED / OPEN) comes from
QCR's type router when the head has one, else from the answer (yes/no = closed);
`Prediction.question_type_source` says which.

Inputs are checked before the model runs: an empty or over-long question, a
missing or unreadable image (the error names the file), and an image too large
to decode are `DataError`s; huge images are downscaled, and 16-bit, grayscale,
RGBA, palette and DICOM images are mapped to 8 bits (`encoders.load_image`).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from .batches import encode_queries, unique_images
from .bundle import BundleFiles, load, load_files, score_kind
from .data.record import CLOSED, OPEN, YES_NO
from .errors import DataError
from .calibration import apply_calibration
from .inference import Predictions, answer_scores, predict
from .ood import BLANK_LEVELS, blank_images, unfamiliar_questions
from .runtimes import ModelRuntime
from .target_risk import TargetRisk
from .text import normalize_answer, tokenize
from .trust import image_ids

log = logging.getLogger(__name__)

MAX_QUESTION_CHARS = 500  # longer text is not a question; the model reads `max_len` words anyway
MAX_IMAGE_SIDE = 2048  # larger images are downscaled on load (the encoder sees a few hundred pixels)


@dataclass
class Prediction:
    """One answered question. `to_dict()` gives the JSON that `medvqa predict` prints."""

    question: str
    answer: str
    score: float  # the answer's score (see score_kind)
    top_k: list[tuple[str, float]]  # best first; answers the head ruled out are left out
    score_kind: str  # "sigmoid" (BCE-trained heads) | "softmax" (multiple choice, --loss ce)
    question_type: str  # "CLOSED" | "OPEN"
    question_type_source: str  # "router" (QCR's type classifier) | "answer" (yes/no answer = closed)
    question_type_score: float | None  # the router's softmax probability; None without a router
    attention_grid: np.ndarray  # (gh, gw) float32, sums to 1: the head's attention over the encoder's grid
    image: Image.Image = field(repr=False)  # the 8-bit image the model saw (after any downscaling)
    warnings: list[str] = field(default_factory=list)  # unknown words, truncation, downscaling
    seconds: float = 0.0  # model time for this question (a batch's time is shared out)
    confidence: float = 0.0  # calibrated probability that `answer` is right (the raw score if uncalibrated)
    calibrated: bool = False  # False for bundles trained before calibration: `confidence` is then `score`
    abstained: bool = False  # "not sure": the answer is withheld (still in `answer` and `top_k`, for reference)
    abstain_reason: str | None = None  # why: low confidence for the risk target, or an out-of-scope input
    target_risk: float | None = None  # the share of wrong answers the abstention threshold allows (this branch's)
    out_of_scope_score: float | None = None  # the image's distance from the training images (vqa.ood)
    # the word overlap (0-1) with the closest question training asked about this image, and the agreement (-1-1:
    # that overlap among the questions training answered as here, less among those answered otherwise; vqa.trust);
    # None where the bundle's calibration does not read them
    familiarity: float | None = None
    agreement: float | None = None

    def attention_map(self, size: tuple[int, int] | None = None) -> np.ndarray:
        """The attention grid upsampled (bilinear) to `size` = (width, height), default the image's:
        (H, W) float32 in [0, 1], the most attended cell at 1."""
        width, height = size or self.image.size
        grid = self.attention_grid / max(float(self.attention_grid.max()), 1e-12)
        up = Image.fromarray(grid.astype(np.float32), mode="F").resize((width, height), Image.Resampling.BILINEAR)
        return np.clip(np.asarray(up, dtype=np.float32), 0.0, 1.0)

    def overlay(self, alpha: float = 0.45) -> Image.Image:
        """The image (RGB) with the attention map drawn over it as a heatmap."""
        base = np.asarray(self.image.convert("RGB"), dtype=np.float32)
        heat = heat_colors(self.attention_map())  # (H, W, 3)
        weight = alpha * self.attention_map()[..., None] ** 0.5  # faint where attention is low
        return Image.fromarray(np.clip(base * (1 - weight) + heat * weight, 0, 255).astype(np.uint8))

    def to_dict(self, attention: bool = False) -> dict[str, Any]:
        out = {
            "question": self.question, "answer": self.answer, "score": round(self.score, 6),
            "score_kind": self.score_kind,
            "top_k": [{"answer": a, "score": round(s, 6)} for a, s in self.top_k],
            "question_type": self.question_type, "question_type_source": self.question_type_source,
            "question_type_score": None if self.question_type_score is None else round(self.question_type_score, 6),
            "confidence": round(self.confidence, 6), "calibrated": self.calibrated, "abstained": self.abstained,
            "abstain_reason": self.abstain_reason, "target_risk": self.target_risk,
            "out_of_scope_score": None if self.out_of_scope_score is None else round(self.out_of_scope_score, 4),
            "familiarity": None if self.familiarity is None else round(self.familiarity, 4),
            "agreement": None if self.agreement is None else round(self.agreement, 4),
            "image_size": list(self.image.size), "warnings": list(self.warnings), "ms": round(self.seconds * 1e3, 2),
        }
        if attention:
            out["attention"] = {"grid_size": list(self.attention_grid.shape),
                                "weights": np.round(self.attention_grid.astype(np.float64), 6).tolist()}
        return out


def heat_colors(values: np.ndarray) -> np.ndarray:
    """[0, 1] -> (..., 3) RGB float in 0..255 on a dark-blue -> red -> yellow scale."""
    stops = np.array([[0, 0, 64], [0, 64, 255], [0, 220, 120], [255, 220, 0], [255, 40, 0]], dtype=np.float32)
    x = np.clip(values, 0.0, 1.0) * (len(stops) - 1)
    low = np.floor(x).astype(int).clip(0, len(stops) - 2)
    t = (x - low)[..., None]
    return stops[low] * (1 - t) + stops[low + 1] * t


def describe_source(image: Any) -> str:
    """How an image is named in error messages: its path, else its type."""
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    if isinstance(image, np.ndarray):
        return f"numpy array {image.shape} {image.dtype}"
    return type(image).__name__


@dataclass
class LoadedImage:
    """An image read and checked once (`read_image`); `predict_batch` accepts these as images."""

    image: Image.Image  # 8-bit "L" or "RGB"
    warnings: list[str]
    source: str  # the path, or a description of the object
    # what was given, where `image` may be a reduced copy of it (a long side of max_side or more: a JPEG that large
    # decodes reduced, a larger image is downscaled); training and eval know an image by its full pixels (vqa.trust)
    full_size: Any = None

    @property
    def identity_source(self) -> Any:
        """What `vqa.trust.image_id` reads to know this image as training and eval do."""
        return self.image if self.full_size is None else self.full_size


def read_image(image: Any, max_side: int = MAX_IMAGE_SIDE) -> LoadedImage:
    """Any supported image (path, PIL, numpy, DICOM) -> an 8-bit "L"/"RGB" image with notes on what was done.

    Raises DataError naming the file when it is missing, unreadable or too large."""
    from encoders import load_image

    if isinstance(image, LoadedImage):
        return image
    if image is None:
        raise DataError("no image given: pass a path, a PIL image, a numpy array or a DICOM file")
    name = describe_source(image)
    try:
        img = load_image(image, max_side=max_side)
    except FileNotFoundError:
        raise DataError(f"image file not found: {name}") from None
    except (ValueError, TypeError, OSError, ImportError) as e:  # ImportError: DICOM without pydicom installed
        raise DataError(str(e) if name in str(e) else f"{name}: {e}") from None
    warnings, full_size = [], image if max(img.size) >= max_side else None
    if max(img.size) > max_side:
        before = img.size
        img.thumbnail((max_side, max_side), Image.Resampling.BILINEAR, reducing_gap=2.0)
        warnings.append(f"image downscaled from {before[0]}x{before[1]} to {img.size[0]}x{img.size[1]}")
    if min(img.size) < 1:
        raise DataError(f"{name}: image is empty ({img.size[0]}x{img.size[1]})")
    return LoadedImage(img, warnings, name, full_size)


def check_choices(choices: Sequence[str]) -> list[str]:
    """A question's choices as records hold them (normalised, as training and eval read them); DataError where one
    reads as nothing (it would vanish) or as another (twins would be one choice)."""
    read = [normalize_answer(c) for c in choices]
    if not all(read) or len(set(read)) < len(read):
        raise DataError(f"choices {list(choices)} read as {read} (case, articles and punctuation dropped): each must "
                        "keep a word and differ from the others")
    return read


def check_question(question: Any, max_chars: int = MAX_QUESTION_CHARS) -> str:
    """The question stripped of surrounding space; DataError when it is not usable text."""
    if not isinstance(question, str):
        raise DataError(f"the question must be text, got {type(question).__name__}")
    text = " ".join(question.split())
    if not text:
        raise DataError("the question is empty: type a question about the image")
    if len(text) > max_chars:
        raise DataError(f"the question is {len(text):,} characters long; the limit is {max_chars:,}")
    if not any(any(c.isalnum() for c in token) for token in tokenize(text)):
        raise DataError(f"the question {text!r} has no words")
    return text


class Predictor:
    """A bundle's model behind `predict` / `predict_batch` (no gradients, any device).

    Answers go through `vqa.inference.predict`, the code training-time validation and
    `medvqa eval` use, on features computed as the feature cache computes them. The network
    runs in PyTorch or, from an ONNX export, in onnxruntime (`vqa.runtimes`); the rest is shared."""

    def __init__(self, runtime: ModelRuntime, files: BundleFiles, path: str | Path | None = None,
                 target_risk: TargetRisk | float | str | None = None) -> None:

        self.runtime, self.device = runtime, runtime.device
        self.answers, self.tokenizer, self.max_len = files.answers, files.tokenizer, files.max_len
        self.choice_len = files.choice_len
        self.config, self.metrics, self.path = files.config, files.metrics, path
        self.has_router = runtime.has_type_router
        self.score_kind = score_kind(files.training_loss(runtime.default_loss), runtime.needs_choices)
        self.calibration, self.ood = files.calibration, files.ood
        # what answering needs that an export made by an earlier version may lack: refused now, not at every question
        if self.ood is not None and not self.ood.reads_model_features and runtime.detector_encoder is None:
            raise DataError(f"{path}: its out-of-scope detector reads {self.ood.describe_space()}, whose graph "
                            "this export lacks: export the bundle again with this version of medvqa")
        if self.calibration is not None and self.calibration.uses_trust and not runtime.has_fused_output:
            raise DataError(f"{path}: its calibration combines confidence with trust scores, which read the head's "
                            "fused vectors, and this export's head graph does not give them: export the bundle again "
                            "with this version of medvqa")
        if target_risk is not None and self.calibration is None:  # it would be reported beside answers never withheld
            raise DataError(f"{path}: an uncalibrated bundle withholds no answer at any target risk: run "
                            "`medvqa calibrate` on it first, or drop the target risk")
        self.target_risk = (TargetRisk.parse(target_risk) if target_risk is not None else
                            self.calibration.target_risk if self.calibration else None)
        self._thresholds: dict[str, float] = {}

    @classmethod
    def from_bundle(cls, path: str | Path, device: str | torch.device = "cpu",
                    threads: int | None = None, target_risk: TargetRisk | float | str | None = None) -> "Predictor":
        """Load a bundle folder (`medvqa train`'s OUT/bundle) for inference in PyTorch.

        `threads` sets torch's intra-op CPU threads for the whole process (None leaves them).
        Small models answer fastest with 1: on 2 cores shared with other work, 2 OpenMP
        threads made the default model ~10x slower (23 ms -> 320 ms median, measured).
        `target_risk` overrides the bundle's abstention target (the share of wrong answers allowed: 0.1, or per
        branch, closed=0.05,open=0.2)."""
        from .runtimes import TorchRuntime
        from .training.precision import resolve_device

        _set_threads(threads)
        started = time.perf_counter()
        bundle = load(path, device="cpu")
        own = bundle.ood.own_encoder(path) if bundle.ood is not None and not bundle.ood.reads_model_features else None
        predictor = cls(TorchRuntime(bundle.model, resolve_device(str(device)), own), bundle, path=path,
                        target_risk=target_risk)
        log.info("loaded %s (%s + %s, %d answers) in %.1fs", path, predictor.runtime.encoder_name,
                 predictor.runtime.head_name, len(predictor.answers), time.perf_counter() - started)
        return predictor

    @classmethod
    def from_onnx(cls, folder: str | Path, threads: int | None = None,
                  target_risk: TargetRisk | float | str | None = None) -> "Predictor":
        """Load an ONNX export (`medvqa export onnx`) to run in onnxruntime on the CPU; `threads` sets both
        onnxruntime's and torch's intra-op threads (torch still decodes the answers)."""
        from .onnx_runtime import OnnxRuntime

        _set_threads(threads)
        files = load_files(folder)
        return cls(OnnxRuntime(folder, files.config, threads=threads), files, path=folder, target_risk=target_risk)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, runtime: str = "torch", device: str | torch.device = "cpu",
                        threads: int | None = None, target_risk: TargetRisk | float | str | None = None,
                        revision: str | None = None) -> "Predictor":
        """A bundle folder, or a Hugging Face Hub repository `org/name` (downloaded once, then read from the hub
        cache; offline, from the cache only), run in PyTorch (`runtime="torch"`) or in onnxruntime
        (`runtime="onnx"`: the folder's ONNX export, itself or its `onnx/` subfolder)."""
        from .hub import resolve_bundle
        from .runtimes import RUNTIMES

        if runtime not in RUNTIMES:
            raise DataError(f"runtime {runtime!r}: expected one of {', '.join(RUNTIMES)}")
        path = resolve_bundle(name_or_path, revision=revision)
        if runtime == "torch":
            return cls.from_bundle(path, device=device, threads=threads, target_risk=target_risk)
        from .onnx_runtime import onnx_folder

        if str(device) not in ("cpu", "auto"):
            raise DataError(f"runtime 'onnx' runs on the CPU (onnxruntime's CPU provider), not on {device}")
        return cls.from_onnx(onnx_folder(path), threads=threads, target_risk=target_risk)

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.runtime.grid_size)

    def describe(self) -> dict[str, Any]:
        """What the demo shows about the model: names, sizes, validation accuracy."""
        val = (self.metrics or {}).get("validation") or {}
        return {"bundle": str(self.path) if self.path else None, "runtime": self.runtime.kind,
                "encoder": self.runtime.encoder_name, "head": self.runtime.head_name, "answers": len(self.answers),
                "score_kind": self.score_kind,
                "question_type_from": "router" if self.has_router else "answer",
                "calibrated": self.calibration is not None,
                "target_risk": self.target_risk.describe(self.calibration.evidence) if self.calibration else None,
                "trust_scores": self.calibration is not None and self.calibration.uses_trust,
                "familiarity": self.calibration is not None and self.calibration.reads_familiarity,
                "out_of_scope_detector": self.ood is not None,
                "out_of_scope_space": self.ood.describe_space() if self.ood is not None else None,
                "validation": {k: val.get(k) for k in ("overall", "closed", "open") if k in val}}

    def predict(self, image: Any, question: str, top_k: int = 5,
                choices: Sequence[str] | None = None) -> Prediction:
        """Answer one question about one image (path, PIL, numpy array or DICOM file)."""
        return self.predict_batch([image], [question], top_k=top_k,
                                  choices=None if choices is None else [choices])[0]

    def predict_batch(self, images: Sequence[Any], questions: Sequence[str], top_k: int = 5,
                      batch_size: int = 32, choices: Sequence[Sequence[str]] | None = None) -> list[Prediction]:
        """Answer `questions[i]` about `images[i]` for every i; each distinct image is encoded once.

        An invalid input raises DataError naming it (and its position, in a batch of several)."""
        if len(images) != len(questions):
            raise DataError(f"{len(images)} images but {len(questions)} questions: pass one image per question")
        if not questions:  # nothing to encode (an empty batch file, a filter that kept nothing)
            return []
        head, needs_choices = self.runtime.head_name, self.runtime.needs_choices
        if needs_choices and choices is None:
            raise DataError(f"this bundle's head ({head}) picks among choices: pass choices=")
        if choices is not None and not needs_choices:
            raise DataError(f"this bundle's head ({head}) answers from its vocabulary; it takes no choices")
        if choices is not None and (len(choices) != len(questions) or not all(choices)):
            raise DataError("pass a non-empty list of choices for every question")
        if top_k < 1:
            raise DataError(f"top_k must be at least 1, got {top_k}")
        started = time.perf_counter()
        texts = [_checked(check_question, q, i, len(questions)) for i, q in enumerate(questions)]
        distinct, rows = unique_images(images)
        position = {r: i for i, r in reversed(list(enumerate(rows)))}  # first question asking about each image
        loaded = [_checked(read_image, im, position[r], len(images)) for r, im in enumerate(distinct)]
        # the choices as records hold them (training and eval read those); the caller's text is what is shown
        options = None if choices is None else [_checked(check_choices, c, i, len(questions))
                                                for i, c in enumerate(choices)]
        queries = encode_queries(texts, rows, self.tokenizer, self.max_len, options, self.choice_len)
        with torch.inference_mode():
            table = self.runtime.encode([item.image for item in loaded], batch_size)
            preds = predict(self.runtime.head, queries, table, self.answers, self.device, batch_size=batch_size,
                            choices=choices)
            if self.ood is not None and not self.ood.reads_model_features:  # the detector's own space
                table = {"pooled": self.runtime.encode_for_detector([item.image for item in loaded], batch_size)}
            pooled = table["pooled"].float()[torch.as_tensor(rows)]  # (Q, D): each question's image
            blank = (blank_images([item.image for item in loaded])[torch.as_tensor(rows)] if self.calibration
                     else torch.zeros(len(rows), dtype=torch.bool))  # only a calibrated bundle withholds answers
            asked, familiarity = {}, [(None, None)] * len(texts)
            if self.calibration is not None and self.calibration.reads_familiarity:
                ids = image_ids([item.identity_source for item in loaded])
                asked = {"questions": texts, "image_ids": [ids[r] for r in rows]}
                familiarity = self.calibration.trust.familiarity_and_agreement(
                    **asked, predicted=preds.logits.argmax(1).tolist()).tolist()
            unfamiliar = unfamiliar_questions(self.tokenizer, texts)
            apply_calibration(self.calibration, self.ood, preds, pooled, self.target_risk, blank, **asked,
                              unfamiliar=unfamiliar)
        image_scores = self.ood.score(pooled) if self.ood is not None else None
        results = self._decode(preds, texts, [loaded[r] for r in rows], top_k, choices, image_scores, blank,
                               unfamiliar)
        for p, (familiar, agreement) in zip(results, familiarity):
            p.familiarity, p.agreement = familiar, agreement
        per_question = (time.perf_counter() - started) / max(len(results), 1)
        for p in results:
            p.seconds = per_question
        return results

    # -- steps ---------------------------------------------------------------------
    def _decode(self, preds: Predictions, texts: list[str], images: list[LoadedImage], top_k: int,
                choices: Sequence[Sequence[str]] | None, image_scores: torch.Tensor | None,
                blank: torch.Tensor, unfamiliar: torch.Tensor) -> list[Prediction]:
        scores = answer_scores(preds.logits, self.score_kind, None if choices is None else [len(c) for c in choices])
        ranked = preds.logits.masked_fill(scores < 0, float("-inf"))  # ruled-out answers and absent choices last
        branches = preds.branches()
        confidence = preds.confidence if preds.confidence is not None else scores.max(-1).values.clamp(min=0.0)
        attention = preds.attention.numpy()  # (Q, N)
        labels = self.answers.answers
        results = []
        for i, text in enumerate(texts):
            k = min(top_k, scores.shape[1] if choices is None else len(choices[i]))
            # ranked by logit: two answers whose sigmoids both round to 1.0 still rank as `predict` chose
            index = ranked[i].topk(k).indices
            values = scores[i, index]
            names = list(choices[i]) if choices is not None else labels
            top = [(str(names[j]), float(v)) for v, j in zip(values.tolist(), index.tolist()) if v >= 0]
            answer, score = top[0] if top else ("", 0.0)
            if preds.type_probs is not None:
                t = int(preds.type_probs[i].argmax())
                qtype, source, qscore = (CLOSED, OPEN)[t], "router", float(preds.type_probs[i, t])
            else:
                qtype, source, qscore = (CLOSED if answer in YES_NO else OPEN), "answer", None
            ood = None if image_scores is None else float(image_scores[i])
            reason = self._abstain_reason(preds, i, text, branches[i], ood, bool(blank[i]), bool(unfamiliar[i]))
            results.append(Prediction(
                question=text, answer=answer, score=score, top_k=top, score_kind=self.score_kind,
                question_type=qtype, question_type_source=source, question_type_score=qscore,
                attention_grid=self._grid(attention[i]), image=images[i].image,
                warnings=images[i].warnings + self._question_notes(text), confidence=float(confidence[i]),
                calibrated=self.calibration is not None, abstained=reason is not None, abstain_reason=reason,
                target_risk=self.target_risk.of(branches[i]) if self.target_risk else None, out_of_scope_score=ood))
        return results

    def threshold(self, branch: str) -> float:
        """The confidence below which a `branch` answer is withheld (at `target_risk`)."""
        if branch not in self._thresholds:
            self._thresholds[branch] = self.calibration.threshold(branch, self.target_risk)
        return self._thresholds[branch]

    def _abstain_reason(self, preds: Predictions, i: int, text: str, branch: str, ood: float | None,
                        blank: bool, unfamiliar: bool) -> str | None:
        """Why answer `i` is withheld, or None: an out-of-scope image or question first, then low confidence."""
        if blank and preds.out_of_scope is not None:  # a calibrated bundle withholds it (apply_calibration)
            return f"the image is blank (its pixels span at most {BLANK_LEVELS} gray levels)"
        if preds.out_of_scope is not None and bool(preds.out_of_scope[i]):
            return (f"the image is unlike the training images (distance {ood:.1f}, above "
                    f"{self.ood.threshold:.1f}, which {100 * self.ood.quantile:.0f}% of training images stay under)")
        if preds.abstained is None or not bool(preds.abstained[i]):
            return None  # a bundle without calibration withholds nothing
        if unfamiliar:
            words = [w for w in tokenize(text) if any(c.isalnum() for c in w)]
            return (f"most of the question's words are unknown to the model ({len(self.tokenizer.unknown_words(text))} "
                    f"of {len(words)})")
        confidence, threshold = float(preds.confidence[i]), self.threshold(branch)
        if threshold == float("inf") and not (self.calibration.evidence.get(branch) or {}).get("confidence"):
            return f"validation gave no {branch.lower()} answers, so nothing shows how often they are right"
        if threshold == float("inf"):
            return (f"on validation, no confidence level kept the {branch.lower()} answers wrong at most "
                    f"{self.target_risk.of(branch):.0%} of the time")
        if confidence < threshold:
            return (f"confidence {confidence:.0%} is below {threshold:.0%}, the level at which validation "
                    f"answers ({branch.lower()}) were wrong at most {self.target_risk.of(branch):.0%} of the time")
        return None

    def _grid(self, weights: np.ndarray) -> np.ndarray:
        """(N,) attention -> (gh, gw) on the encoder's grid (a row when N does not match it)."""
        gh, gw = self.grid_size
        shape = (gh, gw) if gh * gw == weights.size else (1, weights.size)
        return weights.reshape(shape).astype(np.float32)

    def _question_notes(self, text: str) -> list[str]:
        notes = []
        unknown = sorted(set(self.tokenizer.unknown_words(text)))
        if unknown:
            notes.append(f"words the model never saw in training (read as unknown): {', '.join(unknown)}")
        tokens = self.tokenizer.encode(text, MAX_QUESTION_CHARS)[1]  # untruncated: a token is at least a character
        if tokens > self.max_len:
            notes.append(f"the question has {tokens} tokens; the model reads the first {self.max_len}")
        return notes


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise DataError(f"threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)


def _checked(fn, value, i: int, n: int):
    """`fn(value)`, its DataError prefixed with the item's position in a batch of several."""
    try:
        return fn(value)
    except DataError as e:
        raise DataError(f"item {i}: {e}" if n > 1 else str(e)) from None
