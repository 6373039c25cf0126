"""The phantom dataset: deterministic, split by image, and answers that follow from the pixels."""
from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from vqa.errors import DataError
from vqa.phantom import PhantomSpec, generate_phantom, make_image
from vqa.phantom.render import LESION_LABEL, TISSUE_LABELS, render
from vqa.phantom.scene import sample_scene


def _tree_digest(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_dataset_other_seed_differs(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate_phantom(a, 20, seed=3, workers=0)
    generate_phantom(b, 20, seed=3, workers=2)  # worker count must not matter
    generate_phantom(c, 20, seed=4, workers=0)
    assert _tree_digest(a) == _tree_digest(b)
    assert (a / "phantom.jsonl").read_text() != (c / "phantom.jsonl").read_text()


def test_splits_are_by_image(phantom_truth):
    splits = {t["split"] for t in phantom_truth}
    assert splits == {"train", "validate", "test"}
    files = [t["file"] for t in phantom_truth]
    assert len(files) == len(set(files))


def test_every_format_is_written(phantom_dir):
    for path in ["vqa-rad/VQA_RAD_Dataset_Public.json", "vqa-rad/trainset.json", "vqa-rad/testset.json",
                 "slake/train.json", "slake/validate.json", "slake/test.json", "pmc-vqa/train.csv",
                 "pmc-vqa/test.csv", "captions/train.jsonl", "phantom.json"]:
        assert (phantom_dir / path).is_file(), path
    summary = json.loads((phantom_dir / "phantom.json").read_text())
    assert sum(summary["images_per_split"].values()) == 60


def _scenes(n=120):
    for i in range(n):
        rng = np.random.default_rng([11, i])
        yield sample_scene(rng)


def test_lesion_answers_match_the_label_map():
    """Counts, sides and presence asked about are what the label map shows."""
    checked_side = 0
    for scene in _scenes():
        image, labels = render(scene, 256)
        components, n = ndimage.label(labels >= LESION_LABEL)
        assert n == scene.count
        assert scene.abnormal == bool((labels >= LESION_LABEL).any())
        if scene.lesion_side and scene.lesion_organ != "liver":
            cols = np.nonzero(labels >= LESION_LABEL)[1]
            # Radiological convention: the patient's left is on the image's right.
            assert (cols.mean() > 128) == (scene.lesion_side == "left")
            checked_side += 1
    assert checked_side > 10


def test_lesions_are_visible():
    """Each lesion differs from the organ tissue around it by a clear grey-level margin."""
    for scene in _scenes():
        image, labels = render(scene, 256)
        for i in range(scene.count):
            inside = labels == LESION_LABEL + i
            ring = ndimage.binary_dilation(inside, iterations=4) & ~ndimage.binary_dilation(inside, iterations=1)
            ring &= labels == TISSUE_LABELS[scene.lesion_organ]
            contrast = abs(float(image[inside].mean()) - float(image[ring].mean()))
            assert contrast > 15, (scene.modality, scene.lesion_kind, scene.lesion_organ, contrast)


@pytest.mark.parametrize("modality,brighter,darker", [
    ("ct", "bone", "fat"), ("ct", "fat", "lung"), ("mri", "csf", "brain"), ("mri", "fat", "bone"),
    ("x-ray", "bone", "lung"),
])
def test_modality_contrast(modality, brighter, darker):
    """Tissues look as the modality makes them look (CT bone bright, T2 MRI fluid bright, ...)."""
    pairs = []
    for scene in _scenes(300):
        if scene.modality != modality:
            continue
        image, labels = render(scene, 256)
        a, b = labels == TISSUE_LABELS[brighter], labels == TISSUE_LABELS[darker]
        if a.sum() > 50 and b.sum() > 50:
            pairs.append(float(image[a].mean()) - float(image[b].mean()))
    assert pairs and min(pairs) > 20


def test_ground_truth_answers_follow_the_scene(phantom_truth):
    kinds_seen = set()
    for t in phantom_truth:
        s = t["scene"]
        for qa in t["qa"]:
            kinds_seen.add((qa["kind"], qa["answer_type"]))
            q, a = qa["question"], qa["answer"]
            if qa["answer_type"] == "OPEN":
                expected = {"modality": s["modality"], "plane": s["plane"], "organ": s["region"],
                            "count": str(s["count"]), "abnormality": s["lesion_kind"], "size": s["lesion_size"]}
                if qa["kind"] == "position":
                    assert a in (s["location"], s["lesion_side"])
                else:
                    assert a == expected[qa["kind"]], (q, a, s)
            else:
                assert a in ("yes", "no")
                if q in ("Is there a lesion?", "Is this image abnormal?"):
                    assert a == ("yes" if s["abnormal"] else "no")
                if q == "Is there more than one lesion?":
                    assert a == ("yes" if s["count"] > 1 else "no")
                if q.startswith("Is this a ") and q.endswith(" scan?"):
                    named = q[len("Is this a "):-len(" scan?")].lower()
                    assert (a == "yes") == (named == s["modality"])
    assert len(kinds_seen) >= 12


def test_a_multiple_choice_question_has_one_right_choice(phantom_truth):
    """A distractor is never the whole the answer is part of, nor a part of it ('lung' beside 'left lung')."""
    wholes = {"left lung": "lung", "right lung": "lung", "left kidney": "kidney", "right kidney": "kidney",
              "left hemisphere": "brain", "right hemisphere": "brain"}
    asked = [c for item in phantom_truth for c in item["choices"]]
    assert any(c["answer"] in wholes or c["answer"] in wholes.values() for c in asked)  # the case arises
    for c in asked:
        assert c["choices"].count(c["answer"]) == 1 and len(set(c["choices"])) == 4
        others = set(c["choices"]) - {c["answer"]}
        assert wholes.get(c["answer"]) not in others, c
        assert not {part for part, whole in wholes.items() if whole == c["answer"]} & others, c


def test_closed_answers_are_balanced(phantom_truth):
    closed = [qa["answer"] for t in phantom_truth for qa in t["qa"] if qa["answer_type"] == "CLOSED"]
    share_yes = closed.count("yes") / len(closed)
    assert 0.3 < share_yes < 0.7


def test_make_image_depends_only_on_seed_and_index():
    spec = PhantomSpec(100, seed=5)
    a, b = make_image(spec, 7, "train"), make_image(spec, 7, "train")
    assert a.jpeg == b.jpeg and a.qas == b.qas and a.caption == b.caption
    img = Image.open(io.BytesIO(a.jpeg))
    assert img.mode == "L" and img.size == (256, 256)


def test_bad_arguments_and_nothing_half_written(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="at least 10"):
        generate_phantom(tmp_path / "x", 3)
    (tmp_path / "exists").mkdir()
    with pytest.raises(DataError, match="already exists"):
        generate_phantom(tmp_path / "exists", 10)

    import vqa.phantom as phantom

    def broken(*_):
        raise RuntimeError("disk full")

    monkeypatch.setattr(phantom, "write_slake", broken)
    with pytest.raises(RuntimeError):
        generate_phantom(tmp_path / "partial", 10, workers=0)
    assert not (tmp_path / "partial").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".partial")] == []
