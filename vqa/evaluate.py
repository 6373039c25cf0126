"""Evaluation (`medvqa eval`): score a bundle on a benchmark split with the published protocol.

Reports overall / closed / open accuracy (closed/open from the dataset's own
answer_type, never a predicted type), per question type, BLEU and token F1 on
open answers, multiple-choice accuracy for PMC-VQA; VQA-RAD's test is also
scored on MEVF's 308 freeform questions. Writes metrics.json, report.md,
predictions.jsonl and plots.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import torch

from .batches import encode_questions, unique_images
from .bundle import Bundle, load as load_bundle
from .data import load_records, load_vqa_rad
from .data.record import Record
from .errors import DataError
from .features import feature_table
from .inference import Predictions, answer_scores, predict
from .io import atomic_write_json, atomic_write_text
from .metrics import choice_metrics, closed_confusion, vqa_metrics
from .training.precision import check_precision, resolve_device

log = logging.getLogger(__name__)


def predict_records(bundle: Bundle, records: Sequence[Record], device: torch.device, precision: str = "fp32",
                    cache_dir: str | None = None, progress: bool = True) -> Predictions:
    """The bundle's answers to `records`, encoding each image once through the feature cache."""
    images, rows = unique_images([r.image for r in records])
    questions = encode_questions(records, rows, bundle.words, bundle.answers, bundle.max_len, bundle.choice_len)
    table = feature_table(bundle.model.encoder, images, cache_dir, device=device, progress=progress)
    mc = questions.choice_tokens is not None
    return predict(bundle.model, questions, table, bundle.answers, device, precision,
                   choices=[r.choices for r in records] if mc else None)


def score(bundle: Bundle, records: Sequence[Record], preds: Predictions) -> dict:
    """Metrics for one set of records, with the protocol stated beside the numbers."""
    if records and all(r.choices for r in records):
        return choice_metrics(records, preds.answers)
    metrics = vqa_metrics(records, preds.answers, preds.types)
    metrics["answers_in_vocabulary"] = bundle.answers.coverage(records)
    return metrics


def evaluate(bundle_path: str | Path, fmt: str, data: str, split: str = "test", lang: str = "en",
             device: str = "auto", precision: str = "fp32", cache_dir: str | None = None,
             progress: bool = True) -> tuple[dict, list[Record], Predictions]:
    """Score `bundle_path` on `split` of a dataset in format `fmt`; returns (report, records, predictions)."""
    dev = resolve_device(device)
    check_precision(precision, dev)
    bundle = load_bundle(bundle_path, dev)
    records = load_records(fmt, data, split, lang=lang)
    if not records:
        raise DataError(f"{data}: split {split!r} has no questions")
    preds = predict_records(bundle, records, dev, precision, cache_dir, progress)
    report = {
        "bundle": str(bundle_path), "dataset": fmt, "data": str(data), "split": split,
        "score_kind": "softmax" if bundle.model.head.needs_choices else bundle.score_kind,
        "protocol": {
            "closed_open": "the dataset's own answer_type" if fmt != "hf" else "answer_type, or inferred (yes/no)",
            "answers": bundle.answers.protocol,
            "model_selection": bundle.metrics.get("protocol", {}).get("model_selection", "unknown"),
            "validation": bundle.metrics.get("protocol", {}).get("validation", "unknown"),
        },
        "subsets": {"all": score(bundle, records, preds)},
    }
    if fmt == "vqa-rad" and split == "test":
        freeform = {r.source_id for r in load_vqa_rad(data, split, freeform_only=True)}
        keep = [i for i, r in enumerate(records) if r.source_id in freeform]
        if keep and len(keep) < len(records):
            report["subsets"]["freeform"] = score(bundle, [records[i] for i in keep], preds.subset(keep))
    return report, records, preds


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def markdown_report(report: dict) -> str:
    """The numbers as Markdown tables, each with its protocol."""
    p = report["protocol"]
    lines = [f"# {report['dataset']} {report['split']}: `{report['bundle']}`", "",
             f"Protocol: closed/open from {p['closed_open']}; answer vocabulary: {p['answers']}; "
             f"model selection: {p['model_selection']} (validation: {p['validation']}).", ""]
    if "chance" in report["subsets"]["all"]:
        lines += ["| subset | n | multiple-choice accuracy | chance |", "|---|---|---|---|"]
        lines += [f"| {name} | {m['n']} | {_pct(m['overall'])} | {_pct(m['chance'])} |"
                  for name, m in report["subsets"].items()]
        return "\n".join(lines) + "\n"
    lines += ["| subset | n | open | closed | overall | open BLEU | open F1 | in vocabulary |",
              "|---|---|---|---|---|---|---|---|"]
    for name, m in report["subsets"].items():
        lines.append(f"| {name} | {m['n']} | {_pct(m.get('open'))} | {_pct(m.get('closed'))} | "
                     f"{_pct(m['overall'])} | {_pct(m.get('open_bleu'))} | {_pct(m.get('open_f1'))} | "
                     f"{_pct(m.get('answers_in_vocabulary'))} |")
    per_type = report["subsets"]["all"].get("per_question_type", {})
    if per_type:
        lines += ["", "| question type | n | accuracy |", "|---|---|---|"]
        lines += [f"| {t} | {v['n']} | {_pct(v['accuracy'])} |" for t, v in per_type.items()]
    if "type_accuracy" in report["subsets"]["all"]:
        lines += ["", f"QCR type router accuracy: {_pct(report['subsets']['all']['type_accuracy'])}"]
    return "\n".join(lines) + "\n"


def save_plots(report: dict, records: Sequence[Record], preds: Predictions, out: Path) -> list[Path]:
    """per_type.png (accuracy per question type) and, with closed questions, closed_confusion.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    per_type = report["subsets"]["all"].get("per_question_type", {})
    if per_type:
        fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(per_type) + 2), 3.5))
        names = list(per_type)
        ax.bar(names, [100 * (per_type[n]["accuracy"] or 0) for n in names], color="#4c72b0")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"{report['dataset']} {report['split']}: accuracy per question type")
        ax.tick_params(axis="x", rotation=45)
        fig.tight_layout()
        fig.savefig(out / "per_type.png", dpi=120)
        plt.close(fig)
        written.append(out / "per_type.png")
    cols, matrix = closed_confusion(records, preds.answers)
    if any(map(any, matrix)):
        rows = [c for c in cols if c != "other"]
        fig, ax = plt.subplots(figsize=(1.2 * len(cols) + 2, 1.0 * len(rows) + 1.5))
        ax.imshow(matrix, cmap="Blues")
        ax.set_xticks(range(len(cols)), cols)
        ax.set_yticks(range(len(rows)), rows)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        for i, row in enumerate(matrix):
            for j, v in enumerate(row):
                ax.text(j, i, str(v), ha="center", va="center")
        ax.set_title("closed questions")
        fig.tight_layout()
        fig.savefig(out / "closed_confusion.png", dpi=120)
        plt.close(fig)
        written.append(out / "closed_confusion.png")
    return written


def write_outputs(report: dict, records: Sequence[Record], preds: Predictions, out: str | Path) -> Path:
    """metrics.json, report.md, predictions.jsonl (each answer with its score, as the Predictor gives it), plots."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "metrics.json", report)
    atomic_write_text(out / "report.md", markdown_report(report))
    mc = bool(records) and all(r.choices for r in records)
    scores = answer_scores(preds.logits, report.get("score_kind", "sigmoid"),
                           [len(r.choices) for r in records] if mc else None)
    best = scores.max(1).values.tolist() if len(records) else []
    lines = [json.dumps({"source_id": r.source_id, "question": r.question, "answer": r.answer,
                         "answer_type": r.answer_type, "question_type": r.question_type, "prediction": p,
                         "score": round(float(sc), 6), "correct": p == r.answer,
                         **({"predicted_type": t} if t else {})})
             for r, p, t, sc in zip(records, preds.answers, preds.types or [None] * len(records), best)]
    atomic_write_text(out / "predictions.jsonl", "\n".join(lines) + "\n")
    save_plots(report, records, preds, out)
    return out
