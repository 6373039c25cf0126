"""Zero-shot multiple choice with a CLIP model (`medvqa eval --zero-shot-clip MODEL`): PMC-CLIP's PMC-VQA protocol.

No VQA training: each of a question's choices is written into a prompt, and the choice whose prompt
embedding is most similar to the image's wins. Protocol, stated with every number:

- prompts: a template over the question and one choice. Two are measured by default: "{choice}" (the
  choice alone) and "{question} {choice}" (the question in front of it); `--prompt` gives others
  (repeatable; the first is the headline number). The choice text is the dataset's after answer
  normalisation (lower case, articles and punctuation dropped), as `Record.choices` holds it.
- normalisation: image and prompt embeddings are L2-normalised and scored by cosine similarity; the
  highest scoring choice is the answer (ties go to the first listed); its probability is the softmax over
  the question's choices of the model's logit scale x cosine (reported as `confidence`, not calibrated).
- accuracy is exact match of the chosen choice against the answer, beside chance (1 / choices: 25 % for
  PMC-VQA's four). PMC-CLIP reports 24.7 % on PMC-VQA this way.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import torch

from vqa.batches import unique_images
from vqa.data import load_records
from vqa.data.record import Record
from vqa.errors import DataError
from vqa.io import atomic_write_json, atomic_write_text
from vqa.metrics import choice_metrics

log = logging.getLogger(__name__)
DEFAULT_PROMPTS = {"choice": "{choice}", "question+choice": "{question} {choice}"}


def prompt_variants(templates: Sequence[str] | None) -> dict[str, str]:
    """{name: template}: the defaults, or the given templates (each needs {choice}; {question} optional)."""
    if not templates:
        return dict(DEFAULT_PROMPTS)
    out = {}
    for template in templates:
        if "{choice}" not in template:
            raise DataError(f"--prompt {template!r}: a template needs {{choice}} (and may use {{question}})")
        try:
            template.format(question="q", choice="c")
        except (KeyError, IndexError, ValueError) as e:
            raise DataError(f"--prompt {template!r}: only {{question}} and {{choice}} may be filled in ({e})") from None
        out[template] = template
    return out


@torch.no_grad()
def score_choices(clip, records: Sequence[Record], image_embeds: torch.Tensor, rows: Sequence[int],
                  template: str) -> tuple[list[str], list[list[float]]]:
    """Each record's chosen choice and the softmax over its choices (see the module docstring)."""
    texts = sorted({template.format(question=r.question, choice=c) for r in records for c in r.choices})
    index = {t: i for i, t in enumerate(texts)}
    text_embeds = clip.text_embeddings(texts)  # (T, E)
    answers, probabilities = [], []
    for record, row in zip(records, rows):
        ids = [index[template.format(question=record.question, choice=c)] for c in record.choices]
        cosine = text_embeds[ids] @ image_embeds[row]  # (C,)
        best = int(torch.argmax(cosine))  # the first of equal maxima
        answers.append(record.choices[best])
        probabilities.append((clip.logit_scale * cosine).softmax(-1).tolist())
    return answers, probabilities


def evaluate_zero_shot_choice(model: str, fmt: str, data: str, split: str = "test", lang: str = "en",
                              templates: Sequence[str] | None = None, device: str = "auto",
                              cache_dir: str | None = None, progress: bool = True) -> tuple[dict, list[Record], dict]:
    """(report, records, {variant: (answers, probabilities)}) of CLIP `model` on the multiple-choice `split`."""
    from vqa.training import resolve_device

    from .zero_shot_clip import load_zero_shot_clip

    records = load_records(fmt, data, split, lang=lang)
    if not records:
        raise DataError(f"{data}: split {split!r} has no questions")
    without = [r for r in records if len(r.choices) < 2]
    if without:
        raise DataError(f"{data}: {len(without)} of {len(records)} questions of split {split!r} have no choices "
                        f"(e.g. {without[0].question!r}); zero-shot choice needs multiple-choice data (PMC-VQA)")
    variants = prompt_variants(templates)
    clip = load_zero_shot_clip(model, resolve_device(device))
    images, rows = unique_images([r.image for r in records])
    image_embeds = clip.image_embeddings(images, cache_dir, progress)
    predictions, results = {}, {}
    for name, template in variants.items():
        answers, probs = score_choices(clip, records, image_embeds, rows, template)
        predictions[name] = (answers, probs)
        results[name] = {"template": template, **choice_metrics(records, answers)}
        log.info("zero-shot %s: accuracy %.1f%% (chance %.1f%%)", name, 100 * results[name]["overall"],
                 100 * results[name]["chance"])
    first = next(iter(variants))
    report = {"model": str(model), "method": "zero-shot CLIP multiple choice", "dataset": fmt, "data": str(data),
              "split": split, "subsets": {"all": results[first]}, "variants": results, "headline": first,
              "logit_scale": clip.logit_scale,
              "protocol": {"prompt": "one prompt per choice from a template over the question and the choice "
                                     "(normalised choice text)",
                           "normalisation": "L2-normalised image and prompt embeddings, cosine similarity; the highest "
                                            "wins (ties: the first listed); probability = softmax over the choices of "
                                            "logit_scale x cosine",
                           "training": "none (no VQA training)"}}
    return report, records, predictions


def markdown(report: dict) -> str:
    lines = [f"# {report['dataset']} {report['split']}: zero-shot CLIP `{report['model']}`", "",
             f"Protocol: {report['protocol']['prompt']}; {report['protocol']['normalisation']}; no VQA training.", "",
             "| prompt | n | multiple-choice accuracy | chance |", "|---|---|---|---|"]
    for name, m in report["variants"].items():
        lines.append(f"| `{m['template']}` | {m['n']} | {100 * m['overall']:.1f} | {100 * m['chance']:.1f} |")
    return "\n".join(lines) + "\n"


def write_outputs(report: dict, records: Sequence[Record], predictions: dict, out: str | Path) -> Path:
    """metrics.json, report.md and predictions.jsonl (each question with every variant's choice and probabilities)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "metrics.json", report)
    atomic_write_text(out / "report.md", markdown(report))
    lines = []
    for i, r in enumerate(records):
        row = {"source_id": r.source_id, "question": r.question, "choices": list(r.choices), "answer": r.answer}
        for name, (answers, probs) in predictions.items():
            row[name] = {"prediction": answers[i], "probabilities": [round(p, 6) for p in probs[i]],
                         "correct": answers[i] == r.answer}
        lines.append(json.dumps(row))
    atomic_write_text(out / "predictions.jsonl", "\n".join(lines) + "\n")
    return out
