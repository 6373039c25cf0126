"""How many of VQA-RAD's standard test questions have their template in MEVF's training split.

    .venv/bin/python benchmarks/vqa_rad_templates.py --data ../shared/data/vqa-rad

VQA-RAD's release gives each question up to three phrasings: the question as asked (freeform), a
paraphrase, and a templated version (`question_frame`, "Are there >12 of ribs?"). MEVF's split (trainset.json /
testset.json, the one every reference uses) puts freeform and paraphrased questions of the test
phrase types in test and every template in train, the templates of test questions included. This
counts, per answer type, the test questions whose own template (the release item they come from) is
a training question about the same image, and how many of those give it the same answer: a model can
answer them from memory. `medvqa data stats` counts a looser kind of repeat (content words overlapping
by half); docs/results.md scores those apart.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path


def _text(question: object) -> str:
    return " ".join(str(question).lower().split())


def count_templated(root: Path) -> dict:
    """Per answer type of testset.json: its questions, those whose template is a training question about the same
    image, and those of them whose training twin has the same answer."""
    train = json.loads((root / "trainset.json").read_text(encoding="utf-8"))
    test = json.loads((root / "testset.json").read_text(encoding="utf-8"))
    release = json.loads((root / "VQA_RAD_Dataset_Public.json").read_text(encoding="utf-8"))
    trained = {(item["image_name"], _text(item["question"])): _text(item["answer"]) for item in train}
    phrased: dict[tuple[str, str], list[dict]] = {}  # (image, a phrasing of the release item) -> release items
    for item in release:
        for key in ("question", "question_rephrase"):
            if item.get(key) not in (None, "", "NULL"):
                phrased.setdefault((item["image_name"], _text(item[key])), []).append(item)
    counts: dict[str, Counter] = {}
    for item in test:
        kind = str(item["answer_type"]).strip().upper()
        count = counts.setdefault(kind, Counter())
        count["questions"] += 1
        origins = phrased.get((item["image_name"], _text(item["question"])), ())
        frames = {_text(o["question_frame"]) for o in origins if o.get("question_frame") not in (None, "", "NULL")}
        twins = [trained[(item["image_name"], frame)] for frame in frames if (item["image_name"], frame) in trained]
        if twins:
            count["template_in_train"] += 1
            count["same_answer"] += _text(item["answer"]) in twins
    return {kind: dict(count) for kind, count in sorted(counts.items())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True,
                   help="a VQA-RAD folder with trainset.json, testset.json and VQA_RAD_Dataset_Public.json")
    args = p.parse_args()
    counts = count_templated(args.data)
    total = Counter()
    for kind, count in counts.items():
        total.update(count)
        print(f"{kind}: {count.get('template_in_train', 0)} of {count['questions']} test questions have their template "
              f"in train about the same image ({count.get('same_answer', 0)} with the same answer)")
    share = 100 * total["template_in_train"] / total["questions"]
    print(f"all: {total['template_in_train']} of {total['questions']} ({share:.0f}%), {total['same_answer']} with the "
          "same answer")


if __name__ == "__main__":
    main()
