"""Drawing a Scene as a grayscale radiology-like image, with a label map of what is where."""
from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from .scene import Lesion, Scene, Shape

# Display intensities in [0, 1] per modality: CT (soft-tissue window), MRI (T2-like:
# fluid bright, cortical bone and flowing blood dark), X-ray (projection: bone white).
TISSUE = {
    "ct": dict(background=0.0, fat=0.32, soft=0.45, muscle=0.50, bone=0.95, lung=0.07, brain=0.50,
               csf=0.20, liver=0.58, spleen=0.52, kidney=0.62, heart=0.55, vessel=0.62, gas=0.03),
    "mri": dict(background=0.02, fat=0.85, soft=0.35, muscle=0.30, bone=0.12, lung=0.05, brain=0.52,
                csf=0.92, liver=0.32, spleen=0.55, kidney=0.60, heart=0.12, vessel=0.10, gas=0.02),
    "x-ray": dict(background=0.02, fat=0.35, soft=0.45, muscle=0.50, bone=0.90, lung=0.18, brain=0.60,
                  csf=0.60, liver=0.58, spleen=0.50, kidney=0.52, heart=0.65, vessel=0.60, gas=0.15),
}
# A mass enhances (bright on CT/MRI, dense on X-ray); a cyst is fluid or air (dark on CT,
# bright on T2 MRI, lucent on X-ray).
LESION = {"ct": {"mass": 0.82, "cyst": 0.24}, "mri": {"mass": 0.78, "cyst": 0.97},
          "x-ray": {"mass": 0.85, "cyst": 0.04}}
LESION_LABEL = 100  # label map: lesion i is LESION_LABEL + i; 1..n other tissues, 0 background
TISSUE_LABELS = {name: i + 1 for i, name in enumerate(TISSUE["ct"])}


def _pixel_grid(size: int, pose: tuple[float, float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Anatomical coordinates of every pixel centre, under the scene's global pose."""
    scale, angle, dx, dy = pose
    t = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    yy, xx = np.meshgrid(t, t, indexing="ij")
    xx, yy = (xx - dx) / scale, (yy - dy) / scale
    a = np.deg2rad(angle)
    return (np.cos(a) * xx + np.sin(a) * yy).astype(np.float32), (-np.sin(a) * xx + np.cos(a) * yy).astype(np.float32)


def _ellipse_coverage(ax: np.ndarray, ay: np.ndarray, s: Shape | Lesion, px: float) -> tuple[tuple[slice, slice], np.ndarray]:
    """Anti-aliased coverage of an ellipse, computed only inside its bounding box."""
    if isinstance(s, Lesion):
        cx, cy, rx, ry, angle = s.x, s.y, s.radius, s.radius, 0.0
    else:
        cx, cy, rx, ry, angle = s.cx, s.cy, s.rx, s.ry, s.angle
    # Bounding box in pixels: the pose is a similarity, so a generous circle around the ellipse works.
    reach = max(rx, ry) + 3 * px
    near = (np.abs(ax - cx) <= reach) & (np.abs(ay - cy) <= reach)
    rows, cols = np.flatnonzero(near.any(1)), np.flatnonzero(near.any(0))
    if rows.size == 0:
        return (slice(0, 0), slice(0, 0)), np.zeros((0, 0), np.float32)
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    u, v = ax[box] - cx, ay[box] - cy
    a = np.deg2rad(angle)
    u, v = np.cos(a) * u + np.sin(a) * v, -np.sin(a) * u + np.cos(a) * v
    d = np.sqrt((u / rx) ** 2 + (v / ry) ** 2)
    return box, np.clip((1.0 - d) * min(rx, ry) / px + 0.5, 0.0, 1.0)


def render(scene: Scene, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """The image (uint8, size x size) and its label map (uint8: tissue ids, lesions >= 100)."""
    ax, ay = _pixel_grid(size, scene.pose)
    px = 2.0 / size / scene.pose[0]  # one pixel in anatomical units
    table = TISSUE[scene.modality]
    image = np.full((size, size), table["background"], np.float32)
    labels = np.zeros((size, size), np.uint8)
    for shape in scene.shapes:
        box, cover = _ellipse_coverage(ax, ay, shape, px)
        a = cover * shape.alpha
        image[box] = image[box] * (1 - a) + a * table[shape.tissue]
        labels[box][cover > 0.5] = TISSUE_LABELS[shape.tissue]
    value = LESION[scene.modality].get(scene.lesion_kind or "", 0.0)
    for i, lesion in enumerate(scene.lesions):
        box, cover = _ellipse_coverage(ax, ay, lesion, px)
        image[box] = image[box] * (1 - cover) + cover * value
        labels[box][cover > 0.5] = LESION_LABEL + i
    return _acquire(image, scene, size), labels


def _acquire(image: np.ndarray, scene: Scene, size: int) -> np.ndarray:
    """Modality-specific blur, noise and shading, then contrast jitter and 8-bit quantisation."""
    rng = np.random.default_rng(scene.noise_seed)
    s = size / 256
    if scene.modality == "ct":
        image = gaussian_filter(image, 0.6 * s) + rng.normal(0, 0.025, image.shape)
    elif scene.modality == "mri":
        # Coil bias field (smooth multiplicative) and Rician magnitude noise.
        t = np.linspace(-1, 1, size, dtype=np.float32)
        gx, gy = rng.uniform(-0.15, 0.15, 2)
        image = gaussian_filter(image, 0.9 * s) * (1 + gx * t[None, :] + gy * t[:, None])
        noise = rng.normal(0, 0.03, (2, *image.shape))
        image = np.hypot(image + noise[0], noise[1])
    else:
        t = np.linspace(0, 1, size, dtype=np.float32)
        image = gaussian_filter(image, 1.4 * s) * (1.05 - 0.12 * t[:, None]) + rng.normal(0, 0.015, image.shape)
    image = (image - 0.5) * scene.gain + 0.5
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
