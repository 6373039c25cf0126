"""The demo's embedded default model: a small model trained on phantom data, built once and cached.

    from demos.default_model import ensure_default_bundle
    bundle = ensure_default_bundle()        # minutes the first time, then instant

The recipe is a dataclass; its hash names the cache folder
($MEDVQA_CACHE or ~/.cache/medvqa)/models/default-<hash>/, so changing any field
builds a new model, and an old one is never used by mistake. The build runs the
recipe's steps in order in a temp folder next to the cache and renames the result
into place when it is complete, under a lock, so two processes never build twice.

Adding a step (e.g. CLIP pretraining of the encoder before the head is trained):
write `def _pretrain(recipe, work, state, progress)` that reads `state["phantom"]`
and sets `state["encoder"]` to a saved encoder folder, add the fields it needs to
`DefaultModelRecipe`, and insert it into `STEPS` before "train": `_train` uses
`state["encoder"]` when a step has set it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

log = logging.getLogger(__name__)

RECIPE_VERSION = 1  # bump when a step changes what it does with the same fields


@dataclass(frozen=True)
class DefaultModelRecipe:
    # phantom data (see `medvqa phantom`)
    phantom_images: int = 1000
    phantom_seed: int = 0
    phantom_size: int = 256
    # model (see `medvqa train`): small, so an answer takes milliseconds on 2 CPU cores
    encoder: str = "clip-vit-tiny"  # 64 px, 4x4 grid, D=64, 2 layers
    encoder_args: dict = field(default_factory=dict)
    encoder_mode: str = "finetune"  # the tiny tower learns the phantom images with the head
    #                                 (+2.5 points over its frozen random features, measured)
    head: str = "qcr"  # type router + closed/open branches: closed/open comes from the model
    head_args: dict = field(default_factory=lambda: {"hidden_dim": 256, "dropout": 0.1, "attention_dropout": 0.1,
                                                     "classifier_dropout": 0.1})  # MEVF's 0.2-0.5 underfit here
    embed_dim: int = 128
    question_dim: int = 256
    # optimisation: ~4-5 minutes on 1 CPU thread; held-out phantom test accuracy ~80% (modality ~99%)
    epochs: int = 15
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0

    def key(self) -> str:
        """12 hex digits naming this recipe (and the phantom generator and recipe versions)."""
        from vqa.phantom import PHANTOM_VERSION

        spec = {"recipe": dataclasses.asdict(self), "recipe_version": RECIPE_VERSION,
                "phantom_version": PHANTOM_VERSION}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


# -- steps: each reads and extends `state` (paths of what earlier steps made) -------------------
def _phantom(recipe: DefaultModelRecipe, work: Path, state: dict, progress: bool) -> None:
    from vqa.phantom import generate_phantom

    generate_phantom(work / "phantom", n_images=recipe.phantom_images, seed=recipe.phantom_seed,
                     size=recipe.phantom_size, progress=progress)
    state["phantom"] = work / "phantom"


def _train(recipe: DefaultModelRecipe, work: Path, state: dict, progress: bool) -> None:
    from vqa.train import TrainConfig, train

    encoder = state.get("encoder")  # a folder from an earlier step, else the recipe's registered name
    cfg = TrainConfig(
        format="vqa-rad", data=str(state["phantom"] / "vqa-rad"),
        encoder=str(encoder) if encoder else recipe.encoder,
        encoder_args={} if encoder else dict(recipe.encoder_args), encoder_mode=recipe.encoder_mode,
        head=recipe.head, head_args=dict(recipe.head_args), embed_dim=recipe.embed_dim,
        question_dim=recipe.question_dim, epochs=recipe.epochs, batch_size=recipe.batch_size, lr=recipe.lr,
        seed=recipe.seed, device="cpu", out=str(work / "train"), cache_dir=str(work / "features"),
        progress=progress)
    state["bundle"] = train(cfg)


Step = Callable[[DefaultModelRecipe, Path, dict, bool], None]
STEPS: list[tuple[str, Step]] = [("phantom data", _phantom), ("train", _train)]


# -- build and cache ---------------------------------------------------------------------------
def default_model_dir(recipe: DefaultModelRecipe | None = None, root: str | Path | None = None) -> Path:
    from vqa.features import default_cache_root

    recipe = recipe or DefaultModelRecipe()
    return Path(root or default_cache_root() / "models") / f"default-{recipe.key()}"


def ensure_default_bundle(progress: bool = True, recipe: DefaultModelRecipe | None = None,
                          root: str | Path | None = None) -> Path:
    """The default model's bundle folder, built by running `STEPS` the first time (a few minutes)."""
    recipe = recipe or DefaultModelRecipe()
    final = default_model_dir(recipe, root)
    if (final / "bundle" / "config.json").is_file():
        return final / "bundle"
    final.parent.mkdir(parents=True, exist_ok=True)
    with _lock(final.with_name(f".{final.name}.lock")):
        if (final / "bundle" / "config.json").is_file():  # another process built it while we waited
            return final / "bundle"
        work = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
        try:
            _build(recipe, work, progress)
            if final.exists():  # a half-written folder from an older, interrupted layout
                shutil.rmtree(final)
            os.replace(work / "model", final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    log.info("default model ready: %s", final)
    return final / "bundle"


def _build(recipe: DefaultModelRecipe, work: Path, progress: bool) -> None:
    from tqdm import tqdm

    log.info("building the demo's default model (once; cached by recipe %s)", recipe.key())
    state: dict = {}
    started = time.perf_counter()
    bar = tqdm(STEPS, desc="default model", unit="step", disable=not progress)
    for name, step in bar:
        bar.set_postfix_str(name)
        step(recipe, work, state, progress)
    bar.close()
    model = work / "model"
    model.mkdir()
    os.replace(state["bundle"], model / "bundle")
    for extra in ("history.json", "run_config.json"):
        if (Path(state["bundle"]).parent / extra).is_file():
            shutil.copy2(Path(state["bundle"]).parent / extra, model / extra)
    summary = {"recipe": dataclasses.asdict(recipe), "key": recipe.key(), "recipe_version": RECIPE_VERSION,
               "steps": [name for name, _ in STEPS], "build_seconds": round(time.perf_counter() - started, 1)}
    (model / "recipe.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive lock file (POSIX flock; no lock where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # Windows: concurrent builds are then possible but still atomic
        yield
        return
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is building the default model; waiting for it (%s)", path)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
