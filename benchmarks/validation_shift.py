"""Why a VQA-RAD bundle is right more often on its validation split than on test: each split's accuracy by whether the
question restates one the model trained on, and by how it was phrased.

    .venv/bin/python benchmarks/validation_shift.py runs/real/vqa/t-mevf-san-frozen-train/bundle \\
        --data ../shared/data/vqa-rad --threads 1

VQA-RAD's clinicians asked each question freely, then as a templated "frame" and as a paraphrase; MEVF's
trainset.json holds all three kinds of the training questions as separate questions (`phrase_type` freeform, frame,
para), testset.json freeform and para. The official release (VQA_RAD_Dataset_Public.json) links the versions of one
question (its `question`, `question_frame` and `question_rephrase`, and `qid_linked_id`): a question "restates a
training question" where one version of it is among the bundle's training questions. The validation split is the
one the bundle recorded (the one its calibration was fitted on), rebuilt from the data.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def source_questions(official: Path) -> dict[tuple[str, str], int]:
    """(image name, question lower-cased) -> the id of the source question it is a version of."""
    items = json.loads(official.read_text())
    parent = list(range(len(items)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[object, int] = {}
    for i, item in enumerate(items):
        keys = [("link", item["qid_linked_id"])] if item.get("qid_linked_id") else []
        keys += [(item["image_name"], " ".join(str(item[f]).lower().split()))
                 for f in ("question", "question_frame", "question_rephrase") if item.get(f) not in (None, "", "NULL")]
        for key in keys:  # versions sharing a link id or a wording are one question
            parent[root(i)] = root(first.setdefault(key, i))
    return {key: root(i) for key, i in first.items() if key[0] != "link"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path)
    p.add_argument("--data", type=Path, required=True,
                   help="VQA-RAD: trainset.json, testset.json and the official JSON")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from vqa.bundle import load as load_bundle
    from vqa.data import load_records
    from vqa.ensemble import recorded_splits
    from vqa.evaluate import predict_records

    source = source_questions(args.data / "VQA_RAD_Dataset_Public.json")
    phrasing = {split: {str(x["qid"]): x["phrase_type"] for x in json.loads(path.read_text())}
                for split, path in (("train", args.data / "trainset.json"), ("test", args.data / "testset.json"))}

    def source_of(record) -> int | None:
        return source.get((Path(str(record.image)).name, " ".join(record.question.lower().split())))

    bundle = load_bundle(args.bundle, torch.device("cpu"))
    train, val, how = recorded_splits(args.bundle, bundle, "vqa-rad", str(args.data))
    trained = {source_of(r) for r in train} - {None}
    test = load_records("vqa-rad", args.data, "test")
    print(f"{args.bundle}: validation {how}, {len(val)} questions; test {len(test)}")
    print("| split | type | questions | right | restating a training question: share, right | the others: right | "
          "right by phrasing |", "|---|---|---|---|---|---|---|", sep="\n")
    for name, records, split in (("validation", val, "train"), ("test", test, "test")):
        preds = predict_records(bundle, records, torch.device("cpu"), progress=False)
        right = np.array([a == r.answer for a, r in zip(preds.answers, records)])
        restates = np.array([source_of(r) in trained for r in records])
        kind = np.array([phrasing[split].get(r.source_id, "?") for r in records])
        for answer_type in ("CLOSED", "OPEN"):
            m = np.array([r.answer_type == answer_type for r in records])

            def share(mask) -> str:
                return f"{100 * right[mask].mean():.1f}% of {mask.sum()}" if mask.any() else "–"
            phrased = ", ".join(f"{k} {share(m & (kind == k))}" for k in ("freeform", "frame", "para")
                                if (m & (kind == k)).any())
            print(f"| {name} | {answer_type.lower()} | {m.sum()} | {100 * right[m].mean():.1f}% | "
                  f"{100 * restates[m].mean():.0f}%, {share(m & restates)} | {share(m & ~restates)} | {phrased} |")


if __name__ == "__main__":
    main()
