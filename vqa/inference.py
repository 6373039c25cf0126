"""The one inference path: training-time validation, `medvqa eval`, the Predictor, `predict` and the demo.

    preds = predict(model, questions, images, answers, device)   # questions: vqa.batches.QuestionTensors
    scores = answer_scores(preds.logits, score_kind)              # what users are shown

`images` is a feature table ({"grid": (I, N, D), "pooled": (I, D)}, cached or computed by
`vqa.features`) or an `encoders.ImageTable` of pixels (fine-tuning); the model applies its
own feature selection (`VQAModel.select`) either way. `model` is a `VQAModel`, or on
features any `HeadRunner` (an ONNX export run by onnxruntime, `vqa.onnx_runtime`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence

import torch

from .answers import AnswerVocab
from .batches import OPEN_ID, QuestionTensors
from .data.record import CLOSED, OPEN, YES_NO
from .model import VQAModel
from .training.precision import get_autocast

# The precision a bundle answers in (`medvqa eval`'s default, the Predictor's): what its calibration is fitted on,
# whatever precision it trained in
ANSWER_PRECISION = "fp32"

CHOICE_KEYS = ("choice_tokens", "choice_lengths")
CHOICE_BRANCH = "CHOICE"
MASKED = -1.0e3  # logits at or below this are answers the head ruled out (heads.MASKED_LOGIT = -1e4)
SCORE_KINDS = ("sigmoid", "softmax")


class HeadRunner(Protocol):
    """What `predict` runs on feature tables: `VQAModel` itself, or another runtime's graph of it."""

    def eval(self) -> "HeadRunner": ...

    def __call__(self, features: Mapping[str, torch.Tensor], tokens: torch.Tensor, lengths: torch.Tensor,
                 **choices: torch.Tensor) -> Mapping[str, torch.Tensor]: ...


@dataclass
class Predictions:
    answers: list[str]  # predicted answer (or chosen choice) per question
    types: list[str] | None  # the type router's CLOSED/OPEN; None for heads without one
    logits: torch.Tensor  # (Q, A) answers or (Q, C) choices, float32 on the CPU
    attention: torch.Tensor  # (Q, N) the head's attention over the image regions
    type_probs: torch.Tensor | None  # (Q, 2) the router's softmax (CLOSED, OPEN)
    multiple_choice: bool = False
    # filled by vqa.calibration.apply_calibration when the bundle has a calibration:
    confidence: torch.Tensor | None = None  # (Q,) calibrated probability that the answer is right
    abstained: torch.Tensor | None = None  # (Q,) bool: withheld (below the risk threshold, or out of scope)
    out_of_scope: torch.Tensor | None = None  # (Q,) bool: the image is unlike the training images
    fused: torch.Tensor | None = None  # (Q, F) the head's fused vectors, where it has them (trust scores)
    branch_logits: torch.Tensor | None = None  # (Q, 2, A) a routed head's CLOSED and OPEN branches, where asked for

    def subset(self, index: Sequence[int]) -> "Predictions":
        keep = torch.as_tensor(list(index), dtype=torch.long)
        def part(t):
            return None if t is None else t[keep]
        return Predictions([self.answers[i] for i in index], None if self.types is None else
                           [self.types[i] for i in index], self.logits[keep], self.attention[keep],
                           part(self.type_probs), self.multiple_choice, part(self.confidence), part(self.abstained),
                           part(self.out_of_scope), part(self.fused), part(self.branch_logits))

    def branches(self) -> list[str]:
        """The question type the model itself gives each question: "choice" for multiple choice, the type
        router's CLOSED/OPEN when the head has one, else the answer's (yes/no = CLOSED): what calibration and
        abstention are fitted per (never the dataset's own type, which the model does not see)."""
        if self.multiple_choice:
            return [CHOICE_BRANCH] * len(self.answers)
        if self.types is not None:
            return list(self.types)
        return [CLOSED if a in YES_NO else OPEN for a in self.answers]


def model_inputs(model: VQAModel, batch: dict[str, torch.Tensor], images, device: torch.device,
                 transform=None) -> tuple[object, dict]:
    """One batch's image inputs (feature rows, or normalised pixels) and choice tensors on `device`.

    `transform` (training only) maps the batch's uint8 pixels before normalisation (augmentation)."""
    rows = batch["rows"]
    if isinstance(images, dict):
        image_in = {k: v[rows].to(device, non_blocking=True).float() for k, v in images.items()}
    else:
        from encoders import normalize

        pixels = images.pixels[rows]
        image_in = normalize(transform(pixels) if transform else pixels, model.encoder, device)
        image_in = image_in.contiguous(memory_format=torch.channels_last)  # as a fine-tuned encoder's weights
    kwargs = {k: batch[k].to(device, non_blocking=True) for k in CHOICE_KEYS if k in batch}
    return image_in, kwargs


def routed_types(type_probs: torch.Tensor | None) -> list[str] | None:
    """The type router's (Q, 2) softmax as each question's CLOSED/OPEN (None for a head without a router)."""
    return None if type_probs is None else [OPEN if t == OPEN_ID else CLOSED for t in type_probs.argmax(1).tolist()]


@torch.no_grad()
def predict(model: VQAModel | HeadRunner, questions: QuestionTensors, images, answers: AnswerVocab,
            device: torch.device, precision: str = "fp32", batch_size: int = 256,
            choices: Sequence[Sequence[str]] | None = None, branches: bool = False) -> Predictions:
    """The model's answers to every question, in order (the chosen choice for multiple choice); with `branches`, a
    routed head's two branches' logits too (what an ensemble of such heads averages)."""
    model.eval()
    logits, attention, routed, fused, branch = [], [], [], [], []
    for batch in questions.batches(batch_size):
        image_in, kwargs = model_inputs(model, batch, images, device)
        with get_autocast(precision, device):
            out = model(image_in, batch["tokens"].to(device), batch["lengths"].to(device), **kwargs)
        logits.append(out["logits"].float().cpu())
        attention.append(out["attention"].float().cpu())
        if "type_logits" in out:
            routed.append(out["type_logits"].float().softmax(-1).cpu())
        if "fused" in out:
            fused.append(out["fused"].float().cpu())
        if branches and "closed_logits" in out:
            branch.append(torch.stack([out["closed_logits"], out["open_logits"]], 1).float().cpu())
    width = len(answers) if questions.choice_tokens is None else questions.choice_tokens.shape[1]
    scores = torch.cat(logits) if logits else torch.zeros(0, width)
    best = scores.argmax(1).tolist()
    if questions.choice_tokens is not None:
        chosen = [c[i] if i < len(c) else "" for c, i in zip(choices or [], best)]
    else:
        chosen = [answers.answers[i] for i in best]
    type_probs = torch.cat(routed) if routed else None
    types = routed_types(type_probs)
    att = torch.cat(attention) if attention else torch.zeros(0, 1)
    return Predictions(chosen, types, scores, att, type_probs, questions.choice_tokens is not None,
                       fused=torch.cat(fused) if fused else None, branch_logits=torch.cat(branch) if branch else None)


def answer_scores(logits: torch.Tensor, score_kind: str, n_choices: Sequence[int] | None = None) -> torch.Tensor:
    """Logits -> the scores users see: per-answer sigmoids (BCE-trained heads) or a softmax (CE, choices).

    Answers a head ruled out (a QCR branch's other group), and absent choices, score -1."""
    if score_kind not in SCORE_KINDS:
        raise ValueError(f"score_kind must be one of {SCORE_KINDS}, got {score_kind!r}")
    if n_choices is not None:
        valid = torch.arange(logits.shape[1])[None, :] < torch.as_tensor(list(n_choices))[:, None]  # (Q, C)
        return logits.masked_fill(~valid, float("-inf")).softmax(-1).masked_fill(~valid, -1.0)
    scores = logits.softmax(-1) if score_kind == "softmax" else logits.sigmoid()
    return scores.masked_fill(logits <= MASKED, -1.0)
