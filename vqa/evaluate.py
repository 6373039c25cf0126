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
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np
import torch

from .batches import encode_questions, unique_images
from .bundle import Bundle, load as load_bundle, model_digest
from .calibration import apply_calibration, calibration_metrics, reliability
from .ood import unfamiliar_questions
from .data import load_records, load_vqa_rad
from .data.record import CLOSED, OPEN, Record
from .errors import DataError
from .features import feature_table
from .inference import Predictions, answer_scores, predict
from .io import atomic_write_json, atomic_write_text
from .metrics import choice_metrics, closed_confusion, vqa_metrics
from .ood import blank_images
from .target_risk import TargetRisk, abstention_groups, reported_target
from .training.precision import check_precision, resolve_device
from .trust import image_ids

log = logging.getLogger(__name__)


RISKS = {"CLOSED": (0.05, 0.10), "OPEN": (0.20,), "all": (0.05, 0.10, 0.20)}  # coverage reported at these
# Questions the train split asks about the same image in nearly the same words (vqa.stats.repeats_training), and the
# others: scored apart when a test split has both.
REPEAT_SUBSETS = {"repeats_train": True, "new_question": False}


def predict_records(bundle: Bundle, records: Sequence[Record], device: torch.device, precision: str = "fp32",
                    cache_dir: str | None = None, progress: bool = True, branches: bool = False) -> Predictions:
    """The bundle's answers to `records`, encoding each image once through the feature cache (with `branches`, a
    routed head's branch logits too: `vqa.inference.predict`)."""
    return _predict_with_features(bundle, records, device, precision, cache_dir, progress, detector=False,
                                  branches=branches)[0]


def _predict_with_features(bundle: Bundle, records: Sequence[Record], device: torch.device, precision: str,
                           cache_dir: str | None, progress: bool, detector: bool = True, branches: bool = False
                           ) -> tuple[Predictions, torch.Tensor, torch.Tensor | None, list[str] | None]:
    """(predictions, each record's image pooled features (Q, D) in the out-of-scope detector's space: the model's, or
    with `detector` the detector's own encoder's where it has one; with `detector`, whether each image is blank, and
    each image's `vqa.trust.image_id` where the calibration reads familiarity)."""
    head, multiple_choice = bundle.model.head, bool(records) and all(r.choices for r in records)
    if multiple_choice != head.needs_choices:
        raise DataError(f"these questions are {'multiple choice' if multiple_choice else 'open-ended (no choices)'}, "
                        f"but the bundle's head ({head.name}) "
                        f"{'picks among choices' if head.needs_choices else 'answers from its vocabulary'}")
    images, rows = unique_images([r.image for r in records])
    questions = encode_questions(records, rows, bundle.tokenizer, bundle.answers, bundle.max_len, bundle.choice_len)
    table = feature_table(bundle.model.encoder, images, cache_dir, device=device, progress=progress)
    mc = questions.choice_tokens is not None
    preds = predict(bundle.model, questions, table, bundle.answers, device, precision,
                    choices=[r.choices for r in records] if mc else None, branches=branches)
    if not detector:
        return preds, table["pooled"].float()[questions.rows], None, None
    if bundle.ood is not None and not bundle.ood.reads_model_features:
        table = feature_table(bundle.ood.own_encoder(), images, cache_dir, device=device, progress=progress)
    blank, ids = torch.zeros(len(images), dtype=torch.bool), None
    if bundle.calibration is not None:
        blank, ids = _blank_and_ids(images, bundle.calibration.reads_familiarity, progress)
    return (preds, table["pooled"].float()[questions.rows], blank[questions.rows],
            None if ids is None else [ids[r] for r in questions.rows])


def _blank_and_ids(images: Sequence, with_ids: bool, progress: bool, chunk: int = 256
                   ) -> tuple[torch.Tensor, list[str] | None]:
    """Whether each image is blank and (`with_ids`) its `vqa.trust.image_id`: each decoded once, a chunk at a time."""
    from encoders import load_image
    from tqdm import tqdm

    blank, ids = [torch.zeros(0, dtype=torch.bool)], []
    for start in tqdm(range(0, len(images), chunk), desc="image checks", disable=not progress, leave=False):
        decoded = [load_image(im) for im in images[start:start + chunk]]
        blank.append(blank_images(decoded))
        ids += image_ids(decoded) if with_ids else []
    return torch.cat(blank), ids if with_ids else None


def trust_report(bundle: Bundle, records: Sequence[Record], preds: Predictions, score_kind: str,
                 target_risk: TargetRisk | None = None, subsets: dict[str, Sequence[int]] | None = None) -> dict:
    """Calibration before (the raw score of the answer given) and after (the bundle's calibration), closed and
    open apart (the dataset's own type), and abstention at the bundle's target risk: coverage and realised risk.
    `subsets` (name -> record indices) are measured again within each type, without reliability curves."""
    mc = bool(records) and all(r.choices for r in records)
    raw = answer_scores(preds.logits, score_kind, [len(r.choices) for r in records] if mc else None)
    raw = raw.max(-1).values.clamp(min=0.0).numpy()
    correct = np.array([p == r.answer for p, r in zip(preds.answers, records)], dtype=float)
    groups = {"all": list(range(len(records)))} if mc else {
        t: [i for i, r in enumerate(records) if r.answer_type == t] for t in (CLOSED, OPEN)}
    calibration, branches = bundle.calibration, preds.branches()
    after = None if preds.confidence is None else preds.confidence.numpy()
    # with trust scores, the temperature-scaled confidence alone too: what the trust scores add
    plain = (calibration.temperature_confidence(preds.logits, branches).numpy()
             if calibration is not None and calibration.uses_trust else None)
    out: dict = {"calibrated": calibration is not None, "trust_scores": plain is not None,
                 "familiarity": calibration is not None and calibration.reads_familiarity, "bins": 15, "groups": {}}

    def measured(rows: list[int], name: str) -> dict:
        entry = {"before": calibration_metrics(raw[rows], correct[rows], RISKS[name])}
        for key, conf in (("after", after), ("temperature_only", plain)):
            if conf is not None:
                entry[key] = calibration_metrics(conf[rows], correct[rows], RISKS[name])
        return entry

    for name, rows in groups.items():
        if not rows:
            continue
        entry = measured(rows, name)
        if after is not None:
            entry["reliability_after"] = reliability(after[rows], correct[rows])
        entry["reliability_before"] = reliability(raw[rows], correct[rows])
        out["groups"][name] = entry
        for subset, members in (subsets or {}).items():
            part = sorted(set(rows) & set(members))
            if part:
                out.setdefault("subsets", {})[f"{name} {subset}"] = measured(part, name)
    if calibration is None:
        return out
    out["fitted_on"] = calibration.fitted_on
    out["calibration_digest"] = calibration.digest(bundle.ood)  # which one these figures measured (it can be refit)
    flagged = preds.out_of_scope.numpy() if preds.out_of_scope is not None else np.zeros(len(records), dtype=bool)
    answered = ~preds.abstained.numpy()
    out["abstention"] = {"target_risk": (target_risk or calibration.target_risk).to_json(),
                         "out_of_scope_share": float(flagged.mean()),
                         **{name: {"coverage": float(answered[rows].mean()),
                                   "risk": float(1 - correct[rows][answered[rows]].mean()) if answered[rows].any()
                                   else None} for name, rows in groups.items() if rows}}
    return out


def score(bundle: Bundle, records: Sequence[Record], preds: Predictions) -> dict:
    """Metrics for one set of records, with the protocol stated beside the numbers."""
    if records and all(r.choices for r in records):
        return choice_metrics(records, preds.answers)
    metrics = vqa_metrics(records, preds.answers, preds.types)
    metrics["answers_in_vocabulary"] = bundle.answers.coverage(records)
    return metrics


REPORT_PATHS = ("bundle", "data")  # where a report names a folder of the machine that ran it (`shared_report`)
HUB_DATA_FORMATS = ("hf", "pathvqa")  # formats whose data may be a Hub dataset id


def evaluate(bundle_path: str | Path, fmt: str, data: str, split: str = "test", lang: str = "en",
             device: str = "auto", precision: str = "fp32", cache_dir: str | None = None,
             progress: bool = True, target_risk: TargetRisk | float | str | None = None
             ) -> tuple[dict, list[Record], Predictions]:
    """Score `bundle_path` (a bundle folder or a Hub id) on `split` of a dataset in format `fmt`; returns
    (report, records, predictions).

    Abstention is scored at `target_risk` (default: the bundle's)."""
    from .hub import resolve_bundle

    dev = resolve_device(device)
    check_precision(precision, dev)
    folder = resolve_bundle(bundle_path)
    bundle = load_bundle(folder, dev)  # its files checked first: a run folder given for its bundle is named so
    digest = model_digest(folder)  # of the weights just loaded, before scoring: not of what may replace them
    unusable: list[str] = []  # an empty question, answer or choice: the loader skips them, the report says so
    records = load_records(fmt, data, split, lang=lang, skipped=unusable)
    if not records:
        raise DataError(f"{data}: split {split!r} has no questions")
    target_risk = None if target_risk is None else TargetRisk.parse(target_risk)
    preds, pooled, blank, ids = _predict_with_features(bundle, records, dev, precision, cache_dir, progress)
    asked = {} if ids is None else {"questions": [r.question for r in records], "image_ids": ids}
    apply_calibration(bundle.calibration, bundle.ood, preds, pooled, target_risk, blank, **asked,
                      unfamiliar=unfamiliar_questions(bundle.tokenizer, [r.question for r in records]))
    score_kind = "softmax" if bundle.model.head.needs_choices else bundle.score_kind
    report = {
        "bundle": str(bundle_path), "model_digest": digest, "dataset": fmt, "data": str(data), "split": split,
        "score_kind": score_kind,
        "protocol": {
            "closed_open": ("answer_type, or inferred (yes/no) where a record has none" if fmt in ("hf", "pathvqa")
                            else "the dataset's own answer_type"),
            "answers": bundle.answers.protocol,
            "model_selection": bundle.metrics.get("protocol", {}).get("model_selection", "unknown"),
            "validation": bundle.metrics.get("protocol", {}).get("validation", "unknown"),
        },
        "subsets": {"all": score(bundle, records, preds)},
        # not in the numbers (a paper's may count them); the examples name the data folder by its name only
        "unusable": {"n": len(unusable),
                     "examples": [e.replace(str(data), Path(str(data)).name) for e in unusable[:3]]},
    }
    repeated = training_repeats(fmt, data, split, lang, records)
    apart = {} if not 0 < sum(repeated) < len(records) else {  # VQA-RAD's test rephrases training questions
        name: [i for i, f in enumerate(repeated) if f == flag] for name, flag in REPEAT_SUBSETS.items()}
    report["calibration"] = trust_report(bundle, records, preds, score_kind, target_risk, apart)
    if fmt == "vqa-rad" and split == "test":
        freeform = {r.source_id for r in load_vqa_rad(data, split, freeform_only=True)}
        keep = [i for i, r in enumerate(records) if r.source_id in freeform]
        if keep and len(keep) < len(records):
            report["subsets"]["freeform"] = score(bundle, [records[i] for i in keep], preds.subset(keep))
    for name, keep in apart.items():
        report["subsets"][name] = score(bundle, [records[i] for i in keep], preds.subset(keep))
    return report, records, preds


def training_repeats(fmt: str, data: str, split: str, lang: str, records: Sequence[Record]) -> list[bool]:
    """Per record, whether the train split asks about its image in nearly the same words (`vqa.stats`); all False
    when `split` is train itself or the dataset has no train split here."""
    from .stats import repeats_training

    if split == "train":
        return [False] * len(records)
    try:
        train = load_records(fmt, data, "train", lang=lang)
    except (DataError, OSError, ValueError) as e:
        log.info("%s: no train split to find repeated questions in (%s)", data, e)
        return [False] * len(records)
    return repeats_training(records, train)


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def shared_report(report: dict) -> dict:
    """The report as a shared copy records it (`medvqa push`, the shipped model): its bundle and data folders named
    by their name ("local:NAME"), a Hub id as it is (a bundle's, or the data of a format read from the Hub)."""
    from .hub import REPO_ID
    from .io import LOCAL_PATH, shared_path

    def shared(key: str, value: str) -> str:
        hub = key == "bundle" or report.get("dataset") in HUB_DATA_FORMATS
        if value.startswith(LOCAL_PATH) or (hub and REPO_ID.fullmatch(value) and not Path(value).exists()):
            return value
        reduced = shared_path(value, relative=False)  # absolute (POSIX or Windows) or ~: its last name
        if reduced != value:
            return reduced
        name = PurePosixPath(value.replace("\\", "/")).name  # relative: its last name; ".": the folder it was run in
        return LOCAL_PATH + (name if name not in ("", ".", "..") else Path(value).resolve().name)

    return {**report, **{k: shared(k, report[k]) for k in REPORT_PATHS if isinstance(report.get(k), str)}}


def markdown_report(report: dict) -> str:
    """The numbers as Markdown tables, each with its protocol."""
    p = report["protocol"]
    lines = [f"# {report['dataset']} {report['split']}: `{report['bundle']}`", "",
             f"Protocol: closed/open from {p['closed_open']}; answer vocabulary: {p['answers']}; "
             f"model selection: {p['model_selection']} (validation: {p['validation']}).", ""]
    if report.get("unusable", {}).get("n"):
        lines += [f"{report['unusable']['n']} question(s) of the split could not be used (an empty question, answer or "
                  f"choice) and are not in these numbers (counted wrong, they would lower them), e.g. "
                  + "; ".join(report["unusable"]["examples"]), ""]
    if "chance" in report["subsets"]["all"]:
        lines += ["| subset | n | multiple-choice accuracy | chance |", "|---|---|---|---|"]
        lines += [f"| {name} | {m['n']} | {_pct(m['overall'])} | {_pct(m['chance'])} |"
                  for name, m in report["subsets"].items()]
        return "\n".join(lines + _trust_lines(report.get("calibration"))) + "\n"
    if "repeats_train" in report["subsets"]:
        lines += ["`repeats_train`: questions whose image the training split asks about in nearly the same words "
                  "(content words overlap >= 50%), answerable from memory; `new_question`: the others.", ""]
    lines += ["| subset | n | open | closed | overall | open BLEU | open F1 | in vocabulary |",
              "|---|---|---|---|---|---|---|---|"]
    for name, m in report["subsets"].items():
        lines.append(f"| {name} | {m['n']} | {_pct(m.get('open'))} | {_pct(m.get('closed'))} | "
                     f"{_pct(m['overall'])} | {_pct(m.get('open_bleu'))} | {_pct(m.get('open_f1'))} | "
                     f"{_pct(m.get('answers_in_vocabulary'))} |")
    if report["subsets"]["all"].get("open_token_recall") is not None:
        lines += ["", "Open answers, token recall (LLaVA-Med's open-question 'recall': the share of the reference "
                  "answer's words in the prediction): " + ", ".join(
                      f"{name} {_pct(m.get('open_token_recall'))}" for name, m in report["subsets"].items()) + "."]
    per_type = report["subsets"]["all"].get("per_question_type", {})
    if per_type:
        lines += ["", "| question type | n | accuracy |", "|---|---|---|"]
        lines += [f"| {t} | {v['n']} | {_pct(v['accuracy'])} |" for t, v in per_type.items()]
    if "type_accuracy" in report["subsets"]["all"]:
        lines += ["", f"QCR type router accuracy: {_pct(report['subsets']['all']['type_accuracy'])}"]
    if "routed" in report["subsets"]["all"]:
        lines += ["", "As QCR's code scores open and closed (over the questions the router sends to each branch): " +
                  ", ".join(f"{name} {_pct(r['open'])} open ({r['n_open']}) / {_pct(r['closed'])} closed "
                            f"({r['n_closed']})" for name, m in report["subsets"].items()
                            if (r := m.get("routed"))) + "."]
    return "\n".join(lines + _trust_lines(report.get("calibration"))) + "\n"


def _trust_lines(trust: dict | None) -> list[str]:
    """Calibration and abstention as Markdown (before = the raw score of the answer given)."""
    if not trust:
        return []
    state = "calibrated on validation" if trust["calibrated"] else "uncalibrated (a bundle from before calibration)"
    plain = "| coverage, temperature scaling alone |" if trust.get("trust_scores") else "|"
    lines = ["", f"## Confidence ({state})", "",
             "| questions | n | ECE before | ECE after | a calibrated model's ECE (90th pct) | Brier before | Brier after "
             "| AURC after | coverage at risk " + plain,
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if trust.get("trust_scores") else "")]

    def coverage(m: dict) -> str:
        return ", ".join(f"{100 * c:.0f}% at {float(r):.0%}" for r, c in m["coverage_at_risk"].items())

    def floor(m: dict) -> str:  # metrics.json from before the floor was measured lacks it
        f = m.get("ece_if_calibrated")
        return f"{f['mean']:.3f} ({f['p90']:.3f})" if f else "-"

    for name, g in {**trust["groups"], **trust.get("subsets", {})}.items():
        b, a = g["before"], g.get("after", {})
        lines.append(f"| {name.lower()} | {b['n']} | {b['ece']:.3f} | {a.get('ece', float('nan')):.3f} | "
                     f"{floor(a or b)} | {b['brier']:.3f} | {a.get('brier', float('nan')):.3f} | "
                     f"{a.get('aurc', b['aurc']):.3f} | {coverage(a or b)} |"
                     + (f" {coverage(g['temperature_only'])} |" if "temperature_only" in g else ""))
    lines += ["", "A calibrated model's ECE: what a model whose confidence is exactly its probability of being right "
                  "would show on as many questions with the same confidences (simulated), sampling noise alone: "
                  "an ECE near it is as calibrated as this test can tell."]
    if trust.get("trust_scores"):
        lines += ["", "After: temperature scaling combined with trust scores (are the nearest training questions' "
                      "answers the one given?)" + (" and familiarity (was the question asked about this image in "
                                                   "training, in nearly the same words?)" if trust.get("familiarity")
                                                   else "") +
                  ", fitted on validation; the last column ranks by temperature scaling alone."]
    if "abstention" in trust:
        ab = trust["abstention"]
        parts = [f"{name.lower()} {100 * v['coverage']:.0f}% answered, "
                 + (f"{100 * v['risk']:.1f}% of them wrong" if v["risk"] is not None else "none answered")
                 for name, v in abstention_groups(ab).items()]
        lines += ["", f"Abstention at target risk {reported_target(ab)}: " + "; ".join(parts)
                  + f"; {100 * ab['out_of_scope_share']:.1f}% of images flagged out of scope. ECE over 15 bins."]
    return lines


def _plot_trust(trust: dict, out: Path, plt) -> list[Path]:
    """reliability.png (accuracy against confidence per bin, before/after) and risk_coverage.png."""
    groups = trust["groups"]
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 4), squeeze=False)
    for ax, (name, g) in zip(axes[0], groups.items()):
        ax.plot([0, 1], [0, 1], color="#999", lw=1, ls="--")
        for key, label, color in (("reliability_before", "before", "#dd8452"), ("reliability_after", "after",
                                                                               "#4c72b0")):
            pts = g.get(key, [])
            if pts:
                ax.plot([p["confidence"] for p in pts], [p["accuracy"] for p in pts], "o-", color=color,
                        label=f"{label} (ECE {g[label]['ece']:.3f})")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=f"{name.lower()} questions")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "reliability.png", dpi=120)
    plt.close(fig)
    return [out / "reliability.png"]


def save_plots(report: dict, records: Sequence[Record], preds: Predictions, out: Path) -> list[Path]:
    """per_type.png (accuracy per question type), closed_confusion.png (with closed questions), reliability.png
    and risk_coverage.png (confidence)."""
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
    if report.get("calibration", {}).get("groups"):
        written += _plot_trust(report["calibration"], out, plt)
        written += _plot_risk_coverage(report, records, preds, out, plt)
    return written


def _plot_risk_coverage(report: dict, records: Sequence[Record], preds: Predictions, out: Path, plt) -> list[Path]:
    """Selective risk as answers are withheld in order of confidence, before and after calibration."""
    from .calibration import risk_coverage

    fig, ax = plt.subplots(figsize=(5, 4))
    correct = np.array([p == r.answer for p, r in zip(preds.answers, records)], dtype=float)
    raw = answer_scores(preds.logits, report["score_kind"],
                        [len(r.choices) for r in records] if preds.multiple_choice else None)
    for key, conf in (("before", raw.max(-1).values.clamp(min=0.0)), ("after", preds.confidence)):
        if conf is None:
            continue
        coverage, risk = risk_coverage(conf.numpy(), correct)
        ax.plot(coverage, risk, label=f"{key} (AURC {float(risk.mean()):.3f})")
    ax.set(xlabel="coverage (share of questions answered)", ylabel="risk (share of answers wrong)",
           xlim=(0, 1), ylim=(0, 1), title="risk-coverage, all questions")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "risk_coverage.png", dpi=120)
    plt.close(fig)
    return [out / "risk_coverage.png"]


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
    trust = [{} for _ in records] if preds.confidence is None else [
        {"confidence": round(float(c), 6), "abstained": bool(a)} for c, a in zip(preds.confidence, preds.abstained)]
    lines = [json.dumps({"source_id": r.source_id, "question": r.question, "answer": r.answer,
                         "answer_type": r.answer_type, "question_type": r.question_type, "prediction": p,
                         "score": round(float(sc), 6), **extra, "correct": p == r.answer,
                         **({"predicted_type": t} if t else {})})
             for r, p, t, sc, extra in zip(records, preds.answers, preds.types or [None] * len(records), best, trust)]
    atomic_write_text(out / "predictions.jsonl", "\n".join(lines) + "\n")
    save_plots(report, records, preds, out)
    return out
