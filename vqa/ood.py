"""Out-of-scope images: how far an image's features lie from the training images', in the encoder's pooled space.

The score is the Mahalanobis distance to the training images' mean under a Ledoit-Wolf
shrunk covariance (a few hundred images cannot estimate a full D x D covariance). The
threshold is a high quantile (default 99 %) of *out-of-fold* scores: each training image
scored by a detector fitted on the other folds, so that in-distribution images the model
never saw are flagged about 1 % of the time; the detector kept is then fitted on all of
them. Stored in the bundle as `ood.safetensors` (mean, precision, threshold).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import DataError

OOD_FILE = "ood.safetensors"
# scikit-image's sample photographs of everyday scenes and objects (skimage/data): the out-of-scope test set
PHOTOGRAPHS = ("astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "coins.png", "grass.png",
               "gravel.png", "hubble_deep_field.jpg", "moon.png", "motorcycle_left.png", "rocket.jpg")


def _fit_gaussian(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.covariance import LedoitWolf

    lw = LedoitWolf().fit(x)
    return lw.location_, lw.precision_


def _distance(x: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    d = x - mean
    return np.sqrt(np.maximum(np.einsum("nd,de,ne->n", d, precision, d), 0.0))


@dataclass
class OutOfScopeDetector:
    mean: torch.Tensor  # (D,)
    precision: torch.Tensor  # (D, D)
    threshold: float  # a score above it is out of scope
    quantile: float = 0.99

    def score(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, D) pooled features -> (B,) distances (larger: less like the training images)."""
        x = pooled.double().cpu().numpy()
        return torch.from_numpy(_distance(x, self.mean.double().numpy(), self.precision.double().numpy()))

    def out_of_scope(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.score(pooled) > self.threshold

    @classmethod
    def fit(cls, pooled: torch.Tensor, quantile: float = 0.99, folds: int = 5, seed: int = 0) -> "OutOfScopeDetector":
        """Fit on the training images' pooled features (I, D); the threshold from out-of-fold scores."""
        x = pooled.double().cpu().numpy()
        if len(x) < 2 * folds:
            raise DataError(f"the out-of-scope detector needs at least {2 * folds} training images, got {len(x)}")
        order = np.random.default_rng(seed).permutation(len(x))
        oof = np.empty(len(x))
        for part in np.array_split(order, folds):
            rest = np.setdiff1d(order, part)
            oof[part] = _distance(x[part], *_fit_gaussian(x[rest]))
        mean, precision = _fit_gaussian(x)
        return cls(torch.from_numpy(mean).float(), torch.from_numpy(precision).float(),
                   float(np.quantile(oof, quantile)), quantile)

    def save(self, folder: Path) -> None:
        save_file({"mean": self.mean.contiguous(), "precision": self.precision.contiguous(),
                   "threshold": torch.tensor([self.threshold]), "quantile": torch.tensor([self.quantile])},
                  str(Path(folder) / OOD_FILE), metadata={"format": "pt"})

    @classmethod
    def load(cls, folder: Path) -> "OutOfScopeDetector | None":
        path = Path(folder) / OOD_FILE
        if not path.is_file():
            return None
        try:
            t = load_file(str(path))
            return cls(t["mean"], t["precision"], float(t["threshold"][0]), float(t["quantile"][0]))
        except (SafetensorError, OSError, KeyError) as e:
            raise DataError(f"{path}: not a readable out-of-scope detector ({e})") from None
