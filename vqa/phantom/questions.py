"""Questions, answers and captions for a Scene: every answer follows from what is drawn.

Question kinds are the canonical question types (modality, plane, organ,
abnormality, position, count, size). Closed questions are yes/no and built so
that about half are answered "yes".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .scene import LESION_KINDS, MODALITIES, PLANES, REGIONS, Scene

DISPLAY = {"ct": "CT", "mri": "MRI", "x-ray": "X-ray", "pa": "PA", "ultrasound": "Ultrasound"}
# Organs a "lesion in the ...?" question may name, per region (lesions only go in LESION_ORGANS).
ORGANS_SHOWN = {"brain": ["brain"], "chest": ["lung", "heart"], "abdomen": ["liver", "kidney", "spleen"]}
COUNT_WORDS = {1: "a single", 2: "two", 3: "three"}
# Multiple-choice answer domains (PMC-VQA format): the truth plus three distractors.
CHOICE_DOMAINS = {
    "modality": ["ct", "mri", "x-ray", "ultrasound"],
    "plane": list(PLANES),
    "organ": [*REGIONS, "pelvis"],
    "count": ["0", "1", "2", "3"],
    "abnormality": [*LESION_KINDS, "fracture", "hemorrhage"],
    "position": ["left lung", "right lung", "lung", "liver", "left kidney", "right kidney", "kidney",
                 "left hemisphere", "right hemisphere", "brain"],
}
# A whole and its parts: never one the answer and another a distractor (both would be right)
_PARTS = {"lung": {"left lung", "right lung"}, "kidney": {"left kidney", "right kidney"},
          "brain": {"left hemisphere", "right hemisphere"}}


def _both_true(a: str, b: str) -> bool:
    return b in _PARTS.get(a, ()) or a in _PARTS.get(b, ())


@dataclass(frozen=True)
class QA:
    question: str
    answer: str  # normalised form
    answer_type: str  # CLOSED | OPEN
    kind: str  # the canonical question type


def show(value: str) -> str:
    """How a value is written in the data files ('ct' -> 'CT')."""
    return DISPLAY.get(value, value)


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _yes_no(rng: np.random.Generator, truth: str, domain: list[str]) -> tuple[str, bool]:
    """A value to ask about: the true one half of the time, else another from the domain."""
    others = [v for v in domain if v != truth]
    if rng.uniform() < 0.5 or not others:
        return truth, True
    return _pick(rng, others), False


def _open_questions(s: Scene, rng: np.random.Generator) -> dict[str, Callable[[], QA]]:
    qs = {
        "modality": lambda: QA(_pick(rng, ["What imaging modality was used?", "What type of imaging is this?",
                                           "Which imaging modality is shown?", "How was this image acquired?"]),
                               s.modality, "OPEN", "modality"),
        "plane": lambda: QA(_pick(rng, ["In which plane is this image taken?", "What plane is this image in?",
                                        "Which imaging plane is shown?"]), s.plane, "OPEN", "plane"),
        "organ": lambda: QA(_pick(rng, ["What part of the body is shown?", "Which body region is imaged?",
                                        "What organ system is shown in this image?"]), s.region, "OPEN", "organ"),
        "count": lambda: QA(_pick(rng, ["How many lesions are there?", "How many lesions are seen?",
                                        "What is the number of lesions?"]), str(s.count), "OPEN", "count"),
    }
    if s.abnormal:
        qs["position"] = lambda: QA(_pick(rng, ["Where is the lesion?", "Where is the abnormality located?",
                                                "What is the location of the lesion?"]), s.location, "OPEN", "position")
        qs["abnormality"] = lambda: QA(_pick(rng, ["What is the abnormality?", "What kind of lesion is seen?",
                                                   "What abnormality is shown?"]), s.lesion_kind, "OPEN", "abnormality")
        qs["size"] = lambda: QA(_pick(rng, ["How large is the lesion?", "What is the size of the lesion?"]),
                                s.lesion_size, "OPEN", "size")
        if s.lesion_side:
            qs["side"] = lambda: QA(_pick(rng, ["Which side is the lesion on?", "On which side is the abnormality?"]),
                                    s.lesion_side, "OPEN", "position")
    return qs


def _closed_modality(s: Scene, rng: np.random.Generator) -> QA:
    value, truth = _yes_no(rng, s.modality, list(MODALITIES))
    text = _pick(rng, ["Is this a {} image?", "Was this image taken with {}?", "Is this a {} scan?"])
    return QA(text.format(show(value)), "yes" if truth else "no", "CLOSED", "modality")


def _closed_plane(s: Scene, rng: np.random.Generator) -> QA:
    value, truth = _yes_no(rng, s.plane, list(PLANES))
    text = "Is this a {} image?" if value == "pa" else _pick(rng, ["Is this an image in the {} plane?",
                                                                   "Was this image taken in the {} plane?"])
    return QA(text.format(show(value)), "yes" if truth else "no", "CLOSED", "plane")


def _closed_organ(s: Scene, rng: np.random.Generator) -> QA:
    value, truth = _yes_no(rng, s.region, list(REGIONS))
    text = _pick(rng, ["Is this an image of the {}?", "Does this image show the {}?"])
    return QA(text.format(value), "yes" if truth else "no", "CLOSED", "organ")


def _closed_abnormality(s: Scene, rng: np.random.Generator) -> QA:
    choice = int(rng.integers(3))
    if choice == 0:
        text = _pick(rng, ["Is there a lesion?", "Is there an abnormality in this image?", "Is this image abnormal?"])
        return QA(text, "yes" if s.abnormal else "no", "CLOSED", "abnormality")
    if choice == 1:
        return QA(_pick(rng, ["Is this image normal?", "Is this a normal study?"]),
                  "no" if s.abnormal else "yes", "CLOSED", "abnormality")
    value, truth = _yes_no(rng, s.lesion_kind or "mass", list(LESION_KINDS))
    return QA(f"Is there a {value}?", "yes" if truth and s.abnormal else "no", "CLOSED", "abnormality")


def _closed_position(s: Scene, rng: np.random.Generator) -> QA:
    if s.lesion_side and rng.uniform() < 0.5:
        value, truth = _yes_no(rng, s.lesion_side, ["left", "right"])
        return QA(f"Is the lesion on the {value} side?", "yes" if truth else "no", "CLOSED", "position")
    organs = ORGANS_SHOWN[s.region]
    value = _yes_no(rng, s.lesion_organ, organs)[0] if s.abnormal else _pick(rng, organs)
    answer = "yes" if value == s.lesion_organ else "no"
    return QA(f"Is there a lesion in the {value}?", answer, "CLOSED", "position")


def _closed_count(s: Scene, rng: np.random.Generator) -> QA:
    if rng.uniform() < 0.5:
        return QA("Is there more than one lesion?", "yes" if s.count > 1 else "no", "CLOSED", "count")
    return QA("Is there a single lesion?", "yes" if s.count == 1 else "no", "CLOSED", "count")


def _closed_size(s: Scene, rng: np.random.Generator) -> QA:
    value, truth = _yes_no(rng, s.lesion_size, ["small", "large"])
    return QA(f"Is the lesion {value}?", "yes" if truth else "no", "CLOSED", "size")


def ask(scene: Scene, rng: np.random.Generator, n_open: int = 4, n_closed: int = 4) -> list[QA]:
    """Distinct open and closed questions about `scene`, each kind asked at most once per type."""
    open_qs = _open_questions(scene, rng)
    closed_qs = {"modality": _closed_modality, "plane": _closed_plane, "organ": _closed_organ,
                 "abnormality": _closed_abnormality, "position": _closed_position, "count": _closed_count}
    if scene.abnormal:
        closed_qs["size"] = _closed_size
    qas = [open_qs[k]() for k in rng.permutation(sorted(open_qs))[:n_open]]
    qas += [closed_qs[k](scene, rng) for k in rng.permutation(sorted(closed_qs))[:n_closed]]
    return qas


def multiple_choice(scene: Scene, rng: np.random.Generator, n: int = 2) -> list[tuple[QA, list[str]]]:
    """PMC-VQA-style questions: an open question and four shuffled choices holding its answer."""
    pool = [qa for qa in _open_questions(scene, rng).values()]
    pool = [q() for q in pool]
    pool = [qa for qa in pool if qa.kind in CHOICE_DOMAINS and qa.answer in CHOICE_DOMAINS[qa.kind]]
    out = []
    for i in rng.permutation(len(pool))[:n]:
        qa = pool[int(i)]
        others = [v for v in CHOICE_DOMAINS[qa.kind] if v != qa.answer]
        # drawn over all the others as before (the caption drawn next stays the same), a part of the answer or
        # the whole it is part of then passed over
        choices = [qa.answer, *[v for v in rng.permutation(others).tolist() if not _both_true(v, qa.answer)][:3]]
        out.append((qa, [str(c) for c in rng.permutation(choices)]))
    return out


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A report-like sentence naming modality, plane, region and findings."""
    mod, plane, region = show(scene.modality), scene.plane, scene.region
    if scene.modality == "x-ray":
        head = _pick(rng, [f"PA {region} radiograph", f"Frontal (PA) X-ray of the {region}"])
    else:
        head = _pick(rng, [f"{plane.capitalize()} {mod} of the {region}",
                           f"{mod} image of the {region} in the {plane} plane",
                           f"{plane.capitalize()} {mod} {region} image"])
    if not scene.abnormal:
        return head + _pick(rng, [" with no focal lesion.", ": no abnormality seen.", ", unremarkable study."])
    noun = {"mass": "masses", "cyst": "cysts"}[scene.lesion_kind] if scene.count > 1 else scene.lesion_kind
    finding = f"{COUNT_WORDS[scene.count]} {scene.lesion_size} {noun} in the {scene.location}"
    return head + _pick(rng, [f" showing {finding}.", f" demonstrates {finding}.", f": {finding}."])
