"""Writing phantom images and questions in the benchmarks' own on-disk formats.

Each writer produces what the real release looks like, so the real loaders read it:
VQA-RAD (official JSON + MEVF's trainset/testset), SLAKE (per-split JSON + imgs/),
PMC-VQA (CSV with four choices), PathVQA (pickled question lists + images/{split}/),
image classification (ImageFolder trees and MedMNIST-style .npz files of the modality,
organ, abnormal and multi-label findings labels), and caption pairs (PMC-OA-style JSON lines).
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .questions import QA, show
from .scene import Scene

VQA_RAD_TYPES = {"modality": "MODALITY", "plane": "PLANE", "organ": "ORGAN", "abnormality": "ABN",
                 "position": "POS", "count": "COUNT", "size": "SIZE"}
SLAKE_TYPES = {"modality": "Modality", "plane": "Plane", "organ": "Organ", "abnormality": "Abnormality",
               "position": "Position", "count": "Quantity", "size": "Size"}
VQA_RAD_ORGANS = {"brain": "HEAD", "chest": "CHEST", "abdomen": "ABD"}
SLAKE_LOCATIONS = {"brain": "Brain", "chest": "Lung", "abdomen": "Abdomen"}
SLAKE_MODALITIES = {"ct": "CT", "mri": "MRI", "x-ray": "X-Ray"}


@dataclass
class PhantomImage:
    """One generated image with everything asked and said about it."""

    index: int
    split: str  # train | validate | test
    scene: Scene
    qas: list[QA]
    choices: list[tuple[QA, list[str]]]
    caption: str
    jpeg: bytes = field(repr=False)
    qids: list[int] = field(default_factory=list)  # global question ids, set by the writer

    @property
    def file_name(self) -> str:
        return f"phantom_{self.index:05d}.jpg"

    @property
    def slake_name(self) -> str:
        return f"xmlab{self.index}/source.jpg"


def _answer_text(qa: QA, capitalise: bool) -> str:
    text = show(qa.answer)
    return text.capitalize() if capitalise and qa.answer in ("yes", "no") else text


def _place(src: Path, dst: Path) -> None:
    """The same image in another format's folder: a hard link where possible, else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _dump(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def write_images(out: Path, images: list[PhantomImage]) -> None:
    """Each JPEG once under vqa-rad/images, linked into the other formats' folders."""
    for im in images:
        first = out / "vqa-rad" / "images" / im.file_name
        first.parent.mkdir(parents=True, exist_ok=True)
        first.write_bytes(im.jpeg)
        _place(first, out / "slake" / "imgs" / im.slake_name)
        _place(first, out / "pmc-vqa" / "images" / im.file_name)
        _place(first, out / "captions" / "images" / im.file_name)


def write_vqa_rad(out: Path, images: list[PhantomImage]) -> None:
    """The official JSON (test marked by phrase_type 'test_freeform') and MEVF's trainset/testset.

    VQA-RAD has no validation split: our validate images go to train, and the
    trainer carves its own validation split from train.
    """
    official, train, test = [], [], []
    for im in images:
        for qa, qid in zip(im.qas, im.qids):
            is_test = im.split == "test"
            item = {"qid": qid, "image_name": im.file_name, "image_organ": VQA_RAD_ORGANS[im.scene.region],
                    "answer": _answer_text(qa, capitalise=qid % 2 == 0), "answer_type": qa.answer_type,
                    "question_type": VQA_RAD_TYPES[qa.kind], "question": qa.question, "phrase_type": "freeform"}
            (test if is_test else train).append(item)
            official.append({**item, "qid": str(qid), "phrase_type": "test_freeform" if is_test else "freeform",
                             "evaluation": "not evaluated", "question_rephrase": "NULL",
                             "question_relation": "NULL", "question_frame": "NULL"})
    _dump(out / "vqa-rad" / "VQA_RAD_Dataset_Public.json", official)
    _dump(out / "vqa-rad" / "trainset.json", train)
    _dump(out / "vqa-rad" / "testset.json", test)


def write_slake(out: Path, images: list[PhantomImage]) -> None:
    """SLAKE's train/validate/test JSON (English questions) over imgs/xmlabN/source.jpg."""
    splits: dict[str, list[dict]] = {"train": [], "validate": [], "test": []}
    for im in images:
        for qa, qid in zip(im.qas, im.qids):
            splits[im.split].append({
                "img_id": im.index, "img_name": im.slake_name, "question": qa.question,
                "answer": _answer_text(qa, capitalise=False), "q_lang": "en",
                "location": SLAKE_LOCATIONS[im.scene.region], "modality": SLAKE_MODALITIES[im.scene.modality],
                "answer_type": qa.answer_type, "base_type": "vqa", "content_type": SLAKE_TYPES[qa.kind],
                "triple": ["vhead", "_", "_"], "qid": qid,
            })
    for split, items in splits.items():
        _dump(out / "slake" / f"{split}.json", items)


def write_pmc_vqa(out: Path, images: list[PhantomImage]) -> None:
    """PMC-VQA's CSV (choices written 'A:text', the answer as text and as a letter); train holds validate."""
    columns = ["Figure_path", "Question", "Answer", "Choice A", "Choice B", "Choice C", "Choice D", "Answer_label"]
    for split in ("train", "test"):
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(columns)
        for im in images:
            if (im.split == "test") != (split == "test"):
                continue
            for qa, choices in im.choices:
                letters = "ABCD"
                writer.writerow([im.file_name, qa.question, show(qa.answer),
                                 *[f"{letters[i]}:{show(c)}" for i, c in enumerate(choices)],
                                 letters[choices.index(qa.answer)]])
        (out / "pmc-vqa").mkdir(parents=True, exist_ok=True)
        (out / "pmc-vqa" / f"{split}.csv").write_text(buf.getvalue(), encoding="utf-8")


def write_captions(out: Path, images: list[PhantomImage]) -> None:
    """Image-caption pairs as JSON lines (PMC-OA style), with the labels zero-shot evaluation uses."""
    for split in ("train", "validate", "test"):
        lines = []
        for im in images:
            if im.split != split:
                continue
            s = im.scene
            lines.append(json.dumps({"image": f"images/{im.file_name}", "caption": im.caption,
                                     "modality": s.modality, "plane": s.plane, "region": s.region,
                                     "abnormal": "yes" if s.abnormal else "no"}))
        (out / "captions").mkdir(parents=True, exist_ok=True)
        (out / "captions" / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_ground_truth(out: Path, images: list[PhantomImage]) -> None:
    """phantom.jsonl: per image, the scene and every question with its normalised answer."""
    with open(out / "phantom.jsonl", "w", encoding="utf-8") as f:
        for im in images:
            f.write(json.dumps({
                "index": im.index, "split": im.split, "file": im.file_name, "scene": im.scene.to_dict(),
                "caption": im.caption,
                "qa": [{"qid": qid, "question": qa.question, "answer": qa.answer, "answer_type": qa.answer_type,
                        "kind": qa.kind} for qa, qid in zip(im.qas, im.qids)],
                "choices": [{"question": qa.question, "answer": qa.answer, "choices": ch, "kind": qa.kind}
                            for qa, ch in im.choices],
            }) + "\n")


# -- PathVQA and image classification ------------------------------------------------------------------------
PATHVQA_SPLITS = {"train": "train", "validate": "val", "test": "test"}
# The phantom's classification tasks: (MedMNIST-style flag, label names, how a scene is labelled)
CLASSIFICATION_TASKS = {
    "modality": ("phantommodalitymnist", ("ct", "mri", "x-ray"), lambda s: s.modality),
    "organ": ("phantomorganmnist", ("brain", "chest", "abdomen"), lambda s: s.region),
    "abnormal": ("phantomabnormalmnist", ("normal", "abnormal"), lambda s: "abnormal" if s.abnormal else "normal"),
}
# A multi-label set in ChestMNIST's form: each finding present (1) or not (0), all 0 for a normal study
FINDINGS = ("mass", "cyst", "multiple lesions", "large lesion")
FINDINGS_FLAG = "phantomfindingsmnist"
CLASSIFICATION_SIZE = 64  # one of MedMNIST's sizes (28, 64, 128, 224)


def _findings(scene: Scene) -> list[int]:
    return [int(scene.lesion_kind == "mass"), int(scene.lesion_kind == "cyst"), int(scene.count > 1),
            int(scene.lesion_size == "large")]


def write_pathvqa(out: Path, images: list[PhantomImage]) -> None:
    """PathVQA's released layout: qas/{split}_vqa.pkl (img_id, sent, label, answer_type), the same questions in
    qas/{split}/{split}_qa.pkl (image, question, answer), and images/{split}/{split}_NNNN.jpg."""
    import pickle

    per_split: dict[str, list[tuple[PhantomImage, str]]] = {s: [] for s in PATHVQA_SPLITS.values()}
    for im in images:
        split = PATHVQA_SPLITS[im.split]
        per_split[split].append((im, f"{split}_{len(per_split[split]):04d}"))
    for split, members in per_split.items():
        vqa, qa = [], []
        for im, img_id in members:
            _place(out / "vqa-rad" / "images" / im.file_name, out / "pathvqa" / "images" / split / f"{img_id}.jpg")
            for q, qid in zip(im.qas, im.qids):
                answer = _answer_text(q, capitalise=False).lower()  # PathVQA's answers are lower case
                vqa.append({"answer_type": "yes/no" if q.answer_type == "CLOSED" else "other", "img_id": img_id,
                            "label": {answer: 1}, "question_id": qid,
                            "question_type": q.question.split()[0].lower(), "sent": q.question})
                qa.append({"image": img_id, "question": q.question, "answer": answer})
        folder = out / "pathvqa" / "qas"
        (folder / split).mkdir(parents=True, exist_ok=True)
        (folder / f"{split}_vqa.pkl").write_bytes(pickle.dumps(vqa, protocol=4))
        (folder / split / f"{split}_qa.pkl").write_bytes(pickle.dumps(qa, protocol=4))


def _write_npz(path: Path, arrays: dict) -> None:
    """An .npz as numpy writes it, but byte-for-byte reproducible (numpy stamps each member with the time)."""
    import zipfile

    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, array in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue(),
                        compress_type=zipfile.ZIP_DEFLATED)


def write_classification(out: Path, images: list[PhantomImage]) -> None:
    """classification/imagefolder/{task}/{train,val,test}/{class}/*.jpg and MedMNIST-style
    classification/medmnist/{flag}_64.npz (+ {flag}.json, its label names in MedMNIST's INFO form), for the
    modality, organ and abnormal labels, and the multi-label findings set."""
    import numpy as np
    from PIL import Image

    from ..data.classification import BINARY, MULTI_CLASS, MULTI_LABEL, info_entry

    split_of = {"train": "train", "validate": "val", "test": "test"}
    pixels = {im.index: np.asarray(Image.open(io.BytesIO(im.jpeg)).convert("L").resize(
        (CLASSIFICATION_SIZE, CLASSIFICATION_SIZE), Image.Resampling.BICUBIC), dtype=np.uint8) for im in images}
    medmnist = out / "classification" / "medmnist"
    counts = {s: sum(split_of[im.split] == s for im in images) for s in split_of.values()}
    for task, (flag, names, label_of) in CLASSIFICATION_TASKS.items():
        arrays = {}
        for split in split_of.values():
            members = [im for im in images if split_of[im.split] == split]
            for im in members:
                _place(out / "vqa-rad" / "images" / im.file_name, out / "classification" / "imagefolder" / task /
                       split / label_of(im.scene) / im.file_name)
            arrays[f"{split}_images"] = np.stack([pixels[im.index] for im in members])
            arrays[f"{split}_labels"] = np.array([[names.index(label_of(im.scene))] for im in members], np.uint8)
        _write_npz(medmnist / f"{flag}_{CLASSIFICATION_SIZE}.npz", arrays)
        info = info_entry(names, BINARY if len(names) == 2 else MULTI_CLASS,
                          f"Phantom {task} of each image (medvqa's phantom dataset)", n_samples=counts)
        _dump(medmnist / f"{flag}.json", info)
    arrays = {}
    for split in split_of.values():
        members = [im for im in images if split_of[im.split] == split]
        arrays[f"{split}_images"] = np.stack([pixels[im.index] for im in members])
        arrays[f"{split}_labels"] = np.array([_findings(im.scene) for im in members], np.uint8)
    _write_npz(medmnist / f"{FINDINGS_FLAG}_{CLASSIFICATION_SIZE}.npz", arrays)
    _dump(medmnist / f"{FINDINGS_FLAG}.json", info_entry(FINDINGS, MULTI_LABEL, "Phantom findings, multi-label "
                                                         "as ChestMNIST (all 0 for a normal study)", n_samples=counts))
