"""Out-of-scope images: how far an image's features lie from the training images' in a pooled space; blank frames.

The score is the Mahalanobis distance to the training images' mean under a Ledoit-Wolf
shrunk covariance (a few hundred images cannot estimate a full D x D covariance). The
threshold is a high quantile (default 99 %) of *out-of-fold* scores: each training image
scored by a detector fitted on the other folds, so that in-distribution images the model
never saw are flagged about 1 % of the time; the detector kept is then fitted on all of
them. Stored in the bundle as `ood.safetensors` (mean, the covariance in low-rank form, threshold).

The space is the model's own image encoder by default. An encoder trained on a few hundred
small grayscale scans may not tell a photograph from a scan there (MEVF's, fine-tuned by QCR:
AUROC 0.56, `benchmarks/ood_spaces.py`), so the detector can read a frozen encoder of its own
instead (`--ood-encoder efficientnet-lite0-imagenet`: AUROC 1.000 there). That encoder travels
in `ood_encoder/` (by reference when an installed package rebuilds it), and as
`ood_encoder.onnx` in an ONNX export.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import DataError
from .io import atomic_write_safetensors

if TYPE_CHECKING:
    from encoders import ImageEncoder

log = logging.getLogger(__name__)
OOD_FILE = "ood.safetensors"
ENCODER_FOLDER = "ood_encoder"  # the detector's own encoder, when it does not read the model's
MODEL_SPACE = "same"  # --ood-encoder's value for the model's own image encoder
MIN_IMAGES = 20  # fewer training images than this: no detector (its covariance would be mostly shrinkage)
# A blank frame's features can lie among the training images' (a uniform image measured 68-95 in Lite0's space, under
# the QCR bundle's threshold of 120), so blankness is judged on the pixels: 98 % of them within this many gray
# levels. VQA-RAD's 315 images span at least 115.
BLANK_LEVELS = 8
# scikit-image's sample photographs of everyday scenes and objects (skimage/data): the out-of-scope test set
PHOTOGRAPHS = ("astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "coins.png", "grass.png",
               "gravel.png", "hubble_deep_field.jpg", "moon.png", "motorcycle_left.png", "rocket.jpg")


def blank_levels(image) -> float:
    """How many gray levels the middle 98 % of an image's pixels span (a PIL image)."""
    counts = np.bincount(np.asarray(image.convert("L"), dtype=np.uint8).ravel(), minlength=256)
    share = np.cumsum(counts) / counts.sum()  # a histogram: 8-bit images need no sort
    return float(np.searchsorted(share, 0.99) - np.searchsorted(share, 0.01, side="right"))


UNKNOWN_WORDS_LIMIT = 0.5  # a question most of whose words the model never saw is out of scope


def blank_images(images: Sequence) -> torch.Tensor:
    """(I,) bool: which of `images` (PIL images, or files the feature cache reads) are blank frames."""
    from encoders import load_image

    return torch.tensor([blank_levels(im if hasattr(im, "convert") else load_image(im)) <= BLANK_LEVELS
                         for im in images], dtype=torch.bool)


def unfamiliar_questions(tokenizer, questions: Sequence[str]) -> torch.Tensor:
    """(Q,) bool: which questions are mostly words the model never saw (more than UNKNOWN_WORDS_LIMIT of them; a
    subword tokenizer knows every word): out of scope, as a blank frame is."""
    from .text import tokenize

    def unfamiliar(text: str) -> bool:
        words = [w for w in tokenize(text) if any(c.isalnum() for c in w)]
        return bool(words) and len(tokenizer.unknown_words(text)) / len(words) > UNKNOWN_WORDS_LIMIT

    return torch.tensor([unfamiliar(q) for q in questions], dtype=torch.bool)


def photographs() -> list[Path]:
    """The PHOTOGRAPHS the installed scikit-image ships (its data folder; ImportError without it)."""
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    return [p for p in (folder / name for name in PHOTOGRAPHS) if p.is_file()]


def _fit_gaussian(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(mean, basis, inverse eigenvalues, inverse floor) of the Ledoit-Wolf covariance.

    The shrunk covariance is (1-s) S + s mu I; with fewer images than dimensions S has rank < n, so the
    covariance is the floor s mu on all but rank(S) directions. Storing those directions (D x r) and their
    inverse eigenvalues instead of the D x D precision is exact and, for a 1280-d encoder fitted on 300
    images, 5x smaller."""
    from sklearn.covariance import LedoitWolf

    lw = LedoitWolf().fit(x)
    eigenvalues, vectors = np.linalg.eigh(lw.covariance_)
    floor = max(float(eigenvalues.min()), 1e-12 * float(eigenvalues.max()))  # no shrinkage: keep it invertible
    keep = eigenvalues > floor * (1 + 1e-6)
    return lw.location_, vectors[:, keep], 1.0 / eigenvalues[keep], 1.0 / floor


def _distance(x: np.ndarray, mean: np.ndarray, basis: np.ndarray, inverse: np.ndarray,
              inverse_floor: float) -> np.ndarray:
    d = x - mean
    along = d @ basis  # (n, r): the components off the floor
    squared = inverse_floor * (d * d).sum(1) + (along * along) @ (inverse - inverse_floor)
    return np.sqrt(np.maximum(squared, 0.0))


def _from_precision(precision: np.ndarray) -> dict[str, torch.Tensor]:
    eigenvalues, vectors = np.linalg.eigh(precision)  # the precision's largest eigenvalue is the floor's inverse
    top = float(eigenvalues.max())
    keep = eigenvalues < top * (1 - 1e-6)
    return {"basis": torch.from_numpy(vectors[:, keep]).float(), "inverse": torch.from_numpy(eigenvalues[keep]),
            "inverse_floor": torch.tensor([top], dtype=torch.float64)}


@dataclass
class OutOfScopeDetector:
    mean: torch.Tensor  # (D,)
    basis: torch.Tensor  # (D, r) the covariance's eigenvectors above its floor
    inverse: torch.Tensor  # (r,) their inverse eigenvalues
    inverse_floor: float  # 1 / the covariance's eigenvalue on every other direction
    threshold: float  # a score above it is out of scope
    quantile: float = 0.99
    space: str = MODEL_SPACE  # whose pooled features it reads: the model's encoder, or this encoder's name
    encoder: "ImageEncoder | None" = None  # that encoder, frozen, where `space` names one; an ONNX export runs it
    #                                        as a graph instead (vqa.onnx_runtime), and has none

    @property
    def reads_model_features(self) -> bool:
        """True: it scores the model's own pooled features; False: those of its own `encoder`."""
        return self.space == MODEL_SPACE

    def describe_space(self) -> str:
        from .io import shared_path

        return ("the model's image encoder" if self.reads_model_features else
                f"{shared_path(self.space, relative=False)} (its own, frozen)")  # a card names no local folder

    def own_encoder(self, where: str | Path = "the detector") -> "ImageEncoder":
        """The encoder whose space it reads, where that is not the model's (a DataError if it was not loaded)."""
        if self.encoder is None:
            raise DataError(f"{where}: the out-of-scope detector reads {self.space}'s features, but its encoder "
                            f"({ENCODER_FOLDER}/) is missing")
        return self.encoder

    def score(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, D) pooled features -> (B,) distances (larger: less like the training images)."""
        x = pooled.double().cpu().numpy()
        return torch.from_numpy(_distance(x, self.mean.double().numpy(), self.basis.double().numpy(),
                                          self.inverse.double().numpy(), self.inverse_floor))

    def out_of_scope(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.score(pooled) > self.threshold

    @classmethod
    def fit(cls, pooled: torch.Tensor, quantile: float = 0.99, folds: int = 5, seed: int = 0,
            encoder: "ImageEncoder | None" = None) -> "OutOfScopeDetector":
        """Fit on the training images' pooled features (I, D), in `encoder`'s space (None: the model's encoder's);
        the threshold from out-of-fold scores."""
        from .io import shared_path  # the space's name is shared with the bundle: never a folder of this machine

        x = pooled.double().cpu().numpy()
        if len(x) < 2 * folds:
            raise DataError(f"the out-of-scope detector needs at least {2 * folds} training images, got {len(x)}")
        order = np.random.default_rng(seed).permutation(len(x))
        oof = np.empty(len(x))
        for part in np.array_split(order, folds):
            rest = np.setdiff1d(order, part)
            oof[part] = _distance(x[part], *_fit_gaussian(x[rest]))
        mean, basis, inverse, inverse_floor = _fit_gaussian(x)
        return cls(torch.from_numpy(mean).float(), torch.from_numpy(basis).float(), torch.from_numpy(inverse),
                   inverse_floor, float(np.quantile(oof, quantile)), quantile,
                   MODEL_SPACE if encoder is None else shared_path(encoder.name, relative=False), encoder)

    def save(self, folder: Path) -> None:
        """`ood.safetensors` and, for a space of its own, its encoder in `ood_encoder/` (by reference where it can)."""
        from encoders import save_reference

        metadata = {"format": "pt", "space": self.space}
        if not self.reads_model_features:
            encoder = self.own_encoder()
            if not save_reference(encoder, Path(folder) / ENCODER_FOLDER):
                encoder.save_pretrained(Path(folder) / ENCODER_FOLDER)
            # the two are written one after the other: a run stopped between them leaves a pair the load refuses
            metadata["encoder_fingerprint"] = encoder.fingerprint()
        atomic_write_safetensors(Path(folder) / OOD_FILE, {
            "mean": self.mean.contiguous(), "basis": self.basis.contiguous(),
            "inverse": self.inverse.double().contiguous(),
            "inverse_floor": torch.tensor([self.inverse_floor], dtype=torch.float64),
            "threshold": torch.tensor([self.threshold]), "quantile": torch.tensor([self.quantile])},
            metadata=metadata)
        if self.reads_model_features and (Path(folder) / ENCODER_FOLDER).is_dir():  # a refit replaced an own space
            shutil.rmtree(Path(folder) / ENCODER_FOLDER)

    @classmethod
    def load(cls, folder: Path) -> "OutOfScopeDetector | None":
        """The detector of a bundle (or ONNX export) folder; None where it has none. Its own encoder is loaded from
        `ood_encoder/` where the folder has one (an ONNX export has its graph instead)."""
        from safetensors import safe_open

        path = Path(folder) / OOD_FILE
        if not path.is_file():
            return None
        try:
            t = load_file(str(path))
            with safe_open(str(path), "pt") as f:
                metadata = f.metadata() or {}
            space = metadata.get("space", MODEL_SPACE)  # detectors from before spaces: the model's
            if "precision" in t:  # bundles from before the low-rank form: the full D x D precision
                t.update(_from_precision(t["precision"].double().numpy()))
            detector = cls(t["mean"], t["basis"], t["inverse"], float(t["inverse_floor"][0]),
                           float(t["threshold"][0]), float(t["quantile"][0]), space)
        except (SafetensorError, OSError, KeyError) as e:
            raise DataError(f"{path}: not a readable out-of-scope detector ({e})") from None
        if not detector.reads_model_features and (Path(folder) / ENCODER_FOLDER).is_dir():
            from encoders import load_encoder_folder

            detector.encoder = load_encoder_folder(Path(folder) / ENCODER_FOLDER)
            detector.encoder.freeze()
            if detector.encoder.feature_dim != detector.mean.shape[0]:
                raise DataError(f"{Path(folder) / ENCODER_FOLDER}: its features have {detector.encoder.feature_dim} "
                                f"dimensions, but {path} was fitted on {detector.mean.shape[0]}")
            fitted = metadata.get("encoder_fingerprint")
            if fitted is not None and fitted != detector.encoder.fingerprint():
                raise DataError(f"{Path(folder) / ENCODER_FOLDER}: not the encoder {path} was fitted on (a "
                                "calibration stopped while writing them?): run `medvqa calibrate` on the bundle again")
        return detector


def detector_encoder(name: str, model_encoder: "ImageEncoder") -> "ImageEncoder | None":
    """The frozen encoder named by --ood-encoder, or None for the model's own: `same`, or a name that rebuilds the
    model's encoder exactly (frozen, same weights), whose pooled features the model computes anyway."""
    from encoders import create_encoder

    if name == MODEL_SPACE:
        return None
    try:
        with torch.random.fork_rng(devices=[]):  # building it must not move the training seed
            encoder = create_encoder(name)
    except (ValueError, FileNotFoundError) as e:
        raise DataError(f"--ood-encoder {name!r}: {e}") from None
    if model_encoder.frozen and encoder.fingerprint() == model_encoder.fingerprint():
        log.info("out-of-scope detector: %s is the model's own encoder; it reads the model's features", name)
        return None
    encoder.freeze()
    return encoder


def fit_detector(model_encoder: "ImageEncoder", images: Sequence, model_features,
                 encoder: "ImageEncoder | None" = None, device: torch.device | str = "cpu",
                 cache_dir: str | None = None, progress: bool = True) -> OutOfScopeDetector | None:
    """The detector on the training images, in `encoder`'s space (`detector_encoder`; None: the model's), or None,
    with a warning, for very few images. `images` are the distinct training images; `model_features` the rows the
    model reads for them (a feature table, or an encoders.ImageTable of pixels), for the model's own space."""
    from .features import feature_table, pooled_features

    if len(images) < MIN_IMAGES:
        log.warning("only %d training images: no out-of-scope detector (needs %d)", len(images), MIN_IMAGES)
        return None
    if encoder is None:
        if model_encoder.in_chans == 1:  # a grayscale encoder never saw colour, nor much of the world
            log.warning("the out-of-scope detector reads a grayscale encoder's features, where photographs may pass "
                        "as scans (MEVF's, fine-tuned by QCR: AUROC 0.56); --ood-encoder efficientnet-lite0-imagenet "
                        "judges them in ImageNet features (1.000)")
        pooled = pooled_features(model_encoder, model_features, device)
    else:
        log.info("out-of-scope detector: %d training images through %s", len(images), encoder.name)
        pooled = feature_table(encoder, images, cache_dir, device=device, progress=progress)["pooled"].float()
    detector = OutOfScopeDetector.fit(pooled, encoder=encoder)
    log.info("out-of-scope detector in %s: threshold %.2f (%.0f%% of training images, scored out of fold)",
             detector.describe_space(), detector.threshold, 100 * detector.quantile)
    return detector
