"""Example images and questions for the demo: held-out phantom images, drawn once and cached.

The images come from their own seed, so they are never among the default model's
training images, and they cover every modality and body region.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

EXAMPLE_SEED = 424242  # not the seed of any training phantom
QUESTIONS = (
    "What imaging modality was used?",
    "Which body region is imaged?",
    "In which plane is this image taken?",
    "Is there a lesion?",
    "How many lesions are there?",
    "Where is the lesion?",
    "Is this a CT image?",
    "Is this image normal?",
)


@dataclass(frozen=True)
class Example:
    path: Path
    caption: str  # what is drawn, e.g. "CT · chest · axial · 2 lesions"
    answers: dict[str, str]  # question -> the phantom's true answer (for the questions asked of it)


def _pick_indices(n: int, seed: int, pool: int = 200) -> list[int]:
    """Image indices whose scenes cover each (modality, region) pair once before any repeats."""
    from vqa.phantom.scene import sample_scene

    seen: dict[tuple[str, str], int] = {}
    chosen: list[int] = []
    for index in range(pool):
        scene = sample_scene(np.random.default_rng([seed, index]))  # as make_image draws it
        key = (scene.modality, scene.region)
        if key not in seen:
            seen[key] = index
            chosen.append(index)
    chosen += [i for i in range(pool) if i not in chosen]
    return chosen[:n]


def ensure_examples(n: int = 8, seed: int = EXAMPLE_SEED, root: str | Path | None = None) -> list[Example]:
    """`n` phantom example images (256 px JPEG) with captions, written once under the cache folder."""
    from vqa.features import default_cache_root
    from vqa.io import atomic_dir
    from vqa.phantom import PHANTOM_VERSION, make_image
    from vqa.phantom import PhantomSpec
    from vqa.phantom.questions import show

    folder = Path(root or default_cache_root() / "demo") / f"examples-v{PHANTOM_VERSION}-s{seed}-n{n}"
    index_file = folder / "examples.json"
    if not index_file.is_file():
        with atomic_dir(folder, overwrite=True) as tmp:
            rows = []
            spec = PhantomSpec(n_images=max(n, 10), seed=seed)
            for index in _pick_indices(n, seed):
                im = make_image(spec, index, "test")
                (tmp / im.file_name).write_bytes(im.jpeg)
                s = im.scene
                parts = [show(s.modality), s.region, show(s.plane),
                         f"{s.count} lesion{'s' * (s.count != 1)}" if s.abnormal else "normal"]
                rows.append({"file": im.file_name, "caption": " · ".join(parts),
                             "answers": {qa.question: qa.answer for qa in im.qas}})
            (tmp / "examples.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
        log.info("wrote %d demo example images to %s", n, folder)
    rows = json.loads(index_file.read_text(encoding="utf-8"))
    return [Example(folder / r["file"], r["caption"], r["answers"]) for r in rows]
