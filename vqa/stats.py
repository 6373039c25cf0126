"""Dataset statistics: counts, closed/open share, answer distribution and majority baselines."""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Mapping, Sequence

from .data.record import CLOSED, OPEN, Record, image_key


def _majority(train: Sequence[Record], test: Sequence[Record]) -> dict:
    """Accuracy on `test` of always answering train's most frequent answer (overall and per type)."""
    out = {}
    for name, keep in (("overall", None), ("closed", CLOSED), ("open", OPEN)):
        tr = [r for r in train if keep is None or r.answer_type == keep]
        te = [r for r in test if keep is None or r.answer_type == keep]
        if not tr or not te:
            continue
        answer = Counter(r.answer for r in tr).most_common(1)[0][0]
        out[name] = {"answer": answer, "accuracy": sum(r.answer == answer for r in te) / len(te)}
    # Per answer type, each question answered with its own type's majority: the usual "prior" baseline.
    if "closed" in out and "open" in out:
        hits = sum(r.answer == out["closed" if r.answer_type == CLOSED else "open"]["answer"] for r in test)
        out["by_type"] = {"accuracy": hits / len(test)}
    return out


def _choice_majority(train: Sequence[Record], test: Sequence[Record]) -> dict:
    """Multiple choice: pick the choice most often correct in train; random guessing gives 1/#choices."""
    counts = Counter(r.answer for r in train)
    hits = sum(max(r.choices, key=lambda c: counts[c]) == r.answer for r in test)
    chance = sum(1 / len(r.choices) for r in test) / len(test)
    return {"frequent_choice": {"accuracy": hits / len(test)}, "chance": {"accuracy": chance}}


def duplicate_records(records: Sequence[Record]) -> list[Record]:
    """Records that repeat an earlier one (same image, question and answer): each extra copy once."""
    seen: set = set()
    extra = []
    for r in records:
        key = (image_key(r), r.question.lower(), r.answer)
        if key in seen:
            extra.append(r)
        seen.add(key)
    return extra


# Words that carry no content in a radiology question: two phrasings of one question differ mostly in these.
FUNCTION_WORDS = frozenset("a an the is are was were be this that these there here of in on at to for with by from "
                           "image images seen see you do does can any evidence".split())
REPEAT_OVERLAP = 0.5  # content-word Jaccard from which two questions about one image count as one question


def content_words(question: str) -> frozenset[str]:
    """A question's lower-cased words without function words."""
    return frozenset(re.findall(r"[a-z0-9]+", question.lower())) - FUNCTION_WORDS


def word_overlap(a: frozenset[str], b: frozenset[str]) -> float:
    """Jaccard overlap of two questions' content words (0 when both have none)."""
    return len(a & b) / max(len(a | b), 1)


def repeats_training(records: Sequence[Record], train: Sequence[Record],
                     overlap: float = REPEAT_OVERLAP) -> list[bool]:
    """Per record: does `train` ask about the same image in nearly the same words (content-word Jaccard >= `overlap`)?

    VQA-RAD splits by question, not by image: every test image is a training image, and many test questions
    rephrase a training question about it, which a model can answer from memory."""
    by_image: dict[str, list[frozenset[str]]] = {}
    for r in train:
        by_image.setdefault(image_key(r), []).append(content_words(r.question))
    out = []
    for r in records:
        words = content_words(r.question)
        out.append(any(word_overlap(words, seen) >= overlap for seen in by_image.get(image_key(r), ())))
    return out


def dataset_stats(splits: Mapping[str, Sequence[Record]], train: str = "train", test: str = "test",
                  top: int = 10, skipped: Mapping[str, Sequence[str]] | None = None) -> dict:
    """Statistics per split and baselines of `train` on `test`, as a JSON-ready dict.

    `skipped` lists per split the questions the loader could not use (empty question or answer)."""
    report: dict = {"splits": {}}
    for name, records in splits.items():
        n = len(records)
        answers = Counter(r.answer for r in records)
        duplicates = duplicate_records(records)
        report["splits"][name] = {
            "questions": n,
            "skipped": len((skipped or {}).get(name, ())),
            "skipped_examples": list((skipped or {}).get(name, ()))[:3],
            "duplicates": len(duplicates),
            "duplicate_examples": [f"{r.source_id}: {r.question!r} -> {r.answer!r}" for r in duplicates[:3]],
            "images": len({image_key(r) for r in records}),
            "closed_share": sum(r.answer_type == CLOSED for r in records) / max(n, 1),
            "distinct_answers": len(answers),
            "top_answers": answers.most_common(top),
            "question_types": dict(Counter(r.question_type for r in records).most_common()),
        }
    if train in splits and test in splits and splits[test]:
        tr, te = splits[train], splits[test]
        seen = {r.answer for r in tr}
        report["baselines"] = (_choice_majority(tr, te) if all(r.choices for r in te) else _majority(tr, te))
        report["test_answers_seen_in_train"] = sum(r.answer in seen for r in te) / len(te)
        repeated = repeats_training(te, tr)
        report["test_repeating_train"] = {"share": sum(repeated) / len(te),
                                          "closed_share": _share(te, repeated, CLOSED),
                                          "open_share": _share(te, repeated, OPEN)}
    return report


def _share(records: Sequence[Record], flags: Sequence[bool], answer_type: str) -> float | None:
    picked = [f for r, f in zip(records, flags) if r.answer_type == answer_type]
    return sum(picked) / len(picked) if picked else None


def format_stats(report: dict) -> str:
    """A short human-readable rendering of `dataset_stats`."""
    lines = []
    for name, s in report["splits"].items():
        lines.append(f"{name}: {s['questions']} questions over {s['images']} images, "
                     f"{100 * s['closed_share']:.1f}% closed, {s['distinct_answers']} distinct answers")
        lines.append("  top answers: " + ", ".join(f"{a} ({c})" for a, c in s["top_answers"]))
        lines.append("  question types: " + ", ".join(f"{t} ({c})" for t, c in s["question_types"].items()))
        if s["skipped"]:
            lines.append(f"  skipped {s['skipped']} unusable question(s) (empty question or answer), e.g. "
                         + "; ".join(s["skipped_examples"]))
        if s["duplicates"]:
            lines.append(f"  {s['duplicates']} duplicate question(s) (same image, question and answer as an "
                         "earlier one), e.g. " + "; ".join(s["duplicate_examples"]))
    for name, b in report.get("baselines", {}).items():
        answer = f" (always {b['answer']!r})" if "answer" in b else ""
        lines.append(f"baseline {name}: {100 * b['accuracy']:.1f}%{answer}")
    if "test_answers_seen_in_train" in report:
        lines.append(f"test answers seen in train: {100 * report['test_answers_seen_in_train']:.1f}% "
                     "(the ceiling with a train-only answer vocabulary)")
    rep = report.get("test_repeating_train")
    if rep and rep["share"]:
        parts = ", ".join(f"{100 * rep[k]:.1f}% of {k.split('_')[0]}" for k in ("closed_share", "open_share")
                          if rep.get(k) is not None)
        lines.append(f"test questions repeating a training question about the same image (content words overlap "
                     f">= {REPEAT_OVERLAP:.0%}): {100 * rep['share']:.1f}% ({parts}); a model can answer them from "
                     "memory: `medvqa eval` scores them apart")
    templated = report.get("test_templated_in_train")
    if templated:
        parts = ", ".join(f"{c['template_in_train']} of {c['questions']} {kind.lower()}"
                          for kind, c in templated.items())
        lines.append(f"test questions whose templated version (the release's question_frame) is a training question "
                     f"about the same image: {parts}; {sum(c['same_answer'] for c in templated.values())} of them "
                     "with the same answer")
    return "\n".join(lines)


def templated_in_train(root: str | Path) -> dict | None:
    """VQA-RAD: per answer type of MEVF's testset.json, its questions, those whose own templated version (the
    release's `question_frame`) is a training question about the same image, and those of them with the same
    answer; None without the three files (trainset.json, testset.json, VQA_RAD_Dataset_Public.json).

    The release phrases a question up to three ways (as asked, paraphrased, templated) and MEVF's split, every
    reference's, puts every template in train, the test questions' own among them."""
    from .data.local import VQA_RAD_OFFICIAL, VQA_RAD_SPLIT_FILES
    from .io import read_json

    root = Path(root)
    files = [root / VQA_RAD_SPLIT_FILES["train"], root / VQA_RAD_SPLIT_FILES["test"], root / VQA_RAD_OFFICIAL]
    if not all(f.is_file() for f in files):
        return None
    train, test, release = (read_json(f) for f in files)

    def text(value: object) -> str:
        return " ".join(str(value).lower().split())

    trained = {(item["image_name"], text(item["question"])): text(item["answer"]) for item in train}
    phrased: dict[tuple[str, str], list[dict]] = {}  # (image, a phrasing of a release item) -> release items
    for item in release:
        for key in ("question", "question_rephrase"):
            if item.get(key) not in (None, "", "NULL"):
                phrased.setdefault((item["image_name"], text(item[key])), []).append(item)
    counts: dict[str, Counter] = {}
    for item in test:
        count = counts.setdefault(str(item["answer_type"]).strip().upper(), Counter())
        count["questions"] += 1
        origins = phrased.get((item["image_name"], text(item["question"])), ())
        frames = {text(o["question_frame"]) for o in origins if o.get("question_frame") not in (None, "", "NULL")}
        twins = [trained[(item["image_name"], f)] for f in frames if (item["image_name"], f) in trained]
        if twins:
            count["template_in_train"] += 1
            count["same_answer"] += text(item["answer"]) in twins
    return {kind: {"questions": c["questions"], "template_in_train": c["template_in_train"],
                   "same_answer": c["same_answer"]} for kind, c in sorted(counts.items())}
