"""The phantom dataset: deterministic synthetic radiology images with questions and captions.

`generate_phantom(out, n_images, seed)` draws CT-, MRI- and X-ray-like images of the
brain, chest and abdomen in several planes, with or without lesions, asks closed
and open questions whose answers follow from what is drawn, and writes everything
in the on-disk formats of VQA-RAD, SLAKE, PMC-VQA and PathVQA, plus caption pairs and
image classification sets (ImageFolder, MedMNIST .npz). Images are
split train/validate/test by image, so no image is in two splits.
"""
from __future__ import annotations

import io
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError
from ..io import atomic_dir
from .questions import ask, caption, multiple_choice
from .render import render
from .scene import sample_scene
from .writers import (PhantomImage, write_captions, write_classification, write_ground_truth, write_images,
                      write_pathvqa, write_pmc_vqa, write_slake, write_vqa_rad)

log = logging.getLogger(__name__)
PHANTOM_VERSION = 2
SPLIT_FRACTIONS = {"validate": 0.1, "test": 0.2}  # the rest is train


@dataclass(frozen=True)
class PhantomSpec:
    n_images: int
    seed: int = 0
    size: int = 256


def assign_splits(n_images: int, seed: int) -> list[str]:
    """train/validate/test per image index, from a seeded permutation."""
    order = np.random.default_rng([seed, 2**31 - 1]).permutation(n_images)
    n_test = round(n_images * SPLIT_FRACTIONS["test"])
    n_val = round(n_images * SPLIT_FRACTIONS["validate"])
    splits = ["train"] * n_images
    for rank, index in enumerate(order):
        splits[index] = "test" if rank < n_test else ("validate" if rank < n_test + n_val else "train")
    return splits


def make_image(spec: PhantomSpec, index: int, split: str) -> PhantomImage:
    """Image `index` of the dataset; depends only on (seed, index), not on worker scheduling."""
    rng = np.random.default_rng([spec.seed, index])
    scene = sample_scene(rng)
    pixels, _ = render(scene, spec.size)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="JPEG", quality=95)
    return PhantomImage(index=index, split=split, scene=scene, qas=ask(scene, rng),
                        choices=multiple_choice(scene, rng), caption=caption(scene, rng), jpeg=buf.getvalue())


def _make_image_star(args: tuple[PhantomSpec, int, str]) -> PhantomImage:
    return make_image(*args)


def generate_phantom(out: str | Path, n_images: int = 2000, seed: int = 0, size: int = 256,
                     workers: int | None = None, overwrite: bool = False, progress: bool = False) -> dict:
    """Write the phantom dataset to `out` (atomically) and return its summary (counts per split)."""
    if n_images < 10:
        raise DataError(f"--images must be at least 10 (to fill train, validate and test), got {n_images}")
    if not 64 <= size <= 1024:
        raise DataError(f"--size must be between 64 and 1024 pixels, got {size}")
    spec = PhantomSpec(n_images, seed, size)
    jobs = [(spec, i, split) for i, split in enumerate(assign_splits(n_images, seed))]
    workers = min(os.cpu_count() or 1, 8) if workers is None else workers
    log.info("drawing %d phantom images (seed %d, %d px) with %d worker(s)", n_images, seed, size, max(workers, 1))
    with atomic_dir(out, overwrite=overwrite) as tmp:
        images = list(_iterate(jobs, workers, progress))
        qid = 0
        for im in images:
            im.qids = list(range(qid, qid + len(im.qas)))
            qid += len(im.qas)
        write_images(tmp, images)
        for writer in (write_vqa_rad, write_slake, write_pmc_vqa, write_pathvqa, write_classification, write_captions,
                       write_ground_truth):
            writer(tmp, images)
        summary = _summary(spec, images)
        (tmp / "phantom.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    log.info("wrote %s: %s", out, summary["questions"])
    return summary


def _iterate(jobs: list, workers: int, progress: bool):
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc="phantom", unit="img", disable=not progress)
    if workers <= 1:
        for job in jobs:
            yield _make_image_star(job)
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for im in pool.map(_make_image_star, jobs, chunksize=32):
                yield im
                bar.update()
    bar.close()


def _summary(spec: PhantomSpec, images: list[PhantomImage]) -> dict:
    splits = ("train", "validate", "test")
    return {
        "phantom_version": PHANTOM_VERSION, "seed": spec.seed, "images": spec.n_images, "size": spec.size,
        "images_per_split": {s: sum(im.split == s for im in images) for s in splits},
        "questions": {s: sum(len(im.qas) for im in images if im.split == s) for s in splits},
        "multiple_choice": {s: sum(len(im.choices) for im in images if im.split == s) for s in splits},
        "formats": {"vqa-rad": "vqa-rad/", "slake": "slake/", "pmc-vqa": "pmc-vqa/", "pathvqa": "pathvqa/",
                    "captions": "captions/", "classification": "classification/"},
        "note": "VQA-RAD and PMC-VQA have no validation split: their train files hold train+validate images.",
    }


__all__ = ["PHANTOM_VERSION", "PhantomImage", "assign_splits", "generate_phantom", "make_image"]
