"""Running a model over a split: batched scoring of cached features or pixels."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .answers import AnswerVocab
from .batches import OPEN_ID, QuestionTensors
from .data.record import CLOSED, OPEN, Record
from .model import VQAModel
from .precision import get_autocast

CHOICE_KEYS = ("choice_tokens", "choice_lengths")


@dataclass
class Predictions:
    answers: list[str]  # predicted answer (or chosen choice) per question
    types: list[str] | None  # QCR's predicted CLOSED/OPEN, None for heads without a router
    scores: torch.Tensor  # (Q, A) or (Q, C) logits, float32 on CPU


def model_inputs(batch: dict[str, torch.Tensor], images: torch.Tensor | dict[str, torch.Tensor],
                 device: torch.device) -> tuple[object, dict]:
    """Gather one batch's image inputs (feature rows or pixels) and question tensors onto `device`."""
    rows = batch["rows"]
    if isinstance(images, dict):
        image_in = {k: v[rows].to(device, non_blocking=True).float() for k, v in images.items()}
    else:
        image_in = images[rows].to(device, non_blocking=True).float()
    kwargs = {k: batch[k].to(device) for k in CHOICE_KEYS if k in batch}
    return image_in, kwargs


def run_model(model: VQAModel, image_in, tokens: torch.Tensor, lengths: torch.Tensor, **kwargs) -> dict:
    """Features (a dict) go to the head; pixels (a tensor) go through the encoder first."""
    if isinstance(image_in, dict):
        return model(image_in, tokens, lengths, **kwargs)
    return model.forward_pixels(image_in, tokens, lengths, **kwargs)


@torch.no_grad()
def predict(model: VQAModel, questions: QuestionTensors, images, records: Sequence[Record],
            answers: AnswerVocab, device: torch.device, precision: str = "fp32",
            batch_size: int = 256) -> Predictions:
    """Predicted answers for every question (choices for multiple choice), in order."""
    model.eval()
    logits, routed = [], []
    for batch in questions.batches(batch_size):
        image_in, kwargs = model_inputs(batch, images, device)
        with get_autocast(precision, device):
            out = run_model(model, image_in, batch["tokens"].to(device), batch["lengths"].to(device), **kwargs)
        logits.append(out["logits"].float().cpu())
        if "type_logits" in out:
            routed.append(out["type_logits"].argmax(1).cpu())
    scores = torch.cat(logits) if logits else torch.zeros(0, len(answers))
    best = scores.argmax(1).tolist()
    if questions.choice_tokens is not None:
        predicted = [r.choices[i] if i < len(r.choices) else "" for r, i in zip(records, best)]
    else:
        predicted = [answers.answers[i] for i in best]
    types = [OPEN if t == OPEN_ID else CLOSED for t in torch.cat(routed).tolist()] if routed else None
    return Predictions(predicted, types, scores)
