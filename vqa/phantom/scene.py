"""What a phantom image shows: modality, plane, body region, and lesions placed inside organs.

Coordinates are anatomical, in [-1, 1] (x right on the image, y down). Axial,
coronal and PA images follow the radiological convention: the patient's right
is on the image's left (x < 0). Sagittal images have anterior on the left and
no left/right.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MODALITIES = ("ct", "mri", "x-ray")
REGIONS = ("brain", "chest", "abdomen")
CROSS_SECTION_PLANES = ("axial", "coronal", "sagittal")
PLANES = (*CROSS_SECTION_PLANES, "pa")
LESION_KINDS = ("mass", "cyst")
LESION_SIZES = ("small", "large")
SIDES = ("left", "right")
# Organs that may hold lesions, per region; the liver is always on the patient's right.
LESION_ORGANS = {"brain": ("brain",), "chest": ("lung",), "abdomen": ("liver", "kidney")}
_RADIUS = {"small": (0.035, 0.05), "large": (0.085, 0.11)}
_MIN_GAP = 0.03


@dataclass(frozen=True)
class Shape:
    """A filled ellipse of one tissue; `organ`/`side` mark where lesions may go."""

    tissue: str
    cx: float
    cy: float
    rx: float
    ry: float
    angle: float = 0.0  # degrees
    alpha: float = 1.0  # < 1 for overlapping projections (X-ray ribs)
    organ: str | None = None
    side: str | None = None


@dataclass(frozen=True)
class Lesion:
    x: float
    y: float
    radius: float


@dataclass(frozen=True)
class Scene:
    """Everything an image is drawn from, and so everything its questions can ask."""

    modality: str
    plane: str
    region: str
    lesion_kind: str | None = None
    lesion_size: str | None = None
    lesion_organ: str | None = None
    lesion_side: str | None = None  # None on sagittal images
    lesions: tuple[Lesion, ...] = ()
    shapes: tuple[Shape, ...] = field(default=(), repr=False)
    # Nuisance: global pose (scale, rotation in degrees, shift x, shift y), contrast and noise seed.
    pose: tuple[float, float, float, float] = (1.0, 0.0, 0.0, 0.0)
    gain: float = 1.0
    noise_seed: int = 0

    @property
    def abnormal(self) -> bool:
        return bool(self.lesions)

    @property
    def count(self) -> int:
        return len(self.lesions)

    @property
    def location(self) -> str | None:
        """Where the lesions are, as an answer: 'left lung', 'liver', 'right hemisphere', 'brain'."""
        if not self.lesions:
            return None
        if self.lesion_organ == "liver" or not self.lesion_side:  # one liver: its side goes without saying
            return self.lesion_organ
        organ = "hemisphere" if self.lesion_organ == "brain" else self.lesion_organ
        return f"{self.lesion_side} {organ}"

    def to_dict(self) -> dict:
        """The ground truth written beside the data (shapes left out: they are derived)."""
        return {
            "modality": self.modality, "plane": self.plane, "region": self.region,
            "abnormal": self.abnormal, "count": self.count, "lesion_kind": self.lesion_kind,
            "lesion_size": self.lesion_size, "lesion_organ": self.lesion_organ,
            "lesion_side": self.lesion_side, "location": self.location,
            "lesions": [[round(l.x, 4), round(l.y, 4), round(l.radius, 4)] for l in self.lesions],
        }


def _brain(plane: str) -> list[Shape]:
    if plane == "axial":
        return [Shape("soft", 0, 0, .80, .92), Shape("bone", 0, 0, .76, .88),
                Shape("brain", 0, 0, .70, .82, organ="brain"),
                Shape("csf", -.13, -.05, .06, .22, 15), Shape("csf", .13, -.05, .06, .22, -15),
                Shape("csf", 0, .58, .14, .04)]
    if plane == "coronal":
        return [Shape("soft", 0, -.1, .78, .84), Shape("bone", 0, -.1, .74, .80),
                Shape("brain", 0, -.12, .68, .72, organ="brain"), Shape("brain", 0, .72, .12, .24),
                Shape("csf", -.12, -.15, .07, .16, 20), Shape("csf", .12, -.15, .07, .16, -20)]
    return [Shape("soft", 0, 0, .86, .78), Shape("soft", -.78, .35, .18, .28),
            Shape("bone", 0, 0, .82, .74), Shape("brain", .02, -.05, .76, .64, organ="brain"),
            Shape("brain", .38, .45, .26, .17), Shape("brain", .12, .62, .10, .24, -20),
            Shape("csf", 0, -.05, .30, .07, 10)]


def _chest(plane: str, rng: np.random.Generator) -> list[Shape]:
    if plane == "axial":
        ribs = [Shape("bone", .86 * np.cos(t), .58 * np.sin(t), .035, .025)
                for t in np.linspace(0, 2 * np.pi, 14, endpoint=False)]
        return [Shape("fat", 0, 0, .94, .66), Shape("muscle", 0, 0, .88, .60), *ribs,
                Shape("lung", -.42, -.02, .33, .45, organ="lung", side="right"),
                Shape("lung", .42, 0, .31, .43, organ="lung", side="left"),
                Shape("heart", .12, -.18, .26, .22), Shape("vessel", .10, .28, .07, .07),
                Shape("bone", 0, .46, .11, .10), Shape("bone", 0, -.60, .06, .03)]
    if plane == "coronal":
        return [Shape("fat", 0, .05, .90, .95), Shape("muscle", 0, .05, .84, .90),
                Shape("lung", -.40, -.12, .30, .60, organ="lung", side="right"),
                Shape("lung", .40, -.12, .29, .60, organ="lung", side="left"),
                Shape("heart", .12, .30, .30, .25), Shape("vessel", .05, -.20, .06, .30),
                Shape("gas", 0, -.72, .05, .20), Shape("liver", -.35, .85, .45, .20)]
    if plane == "sagittal":
        return [Shape("fat", 0, .05, .75, .95), Shape("muscle", 0, .05, .70, .90),
                Shape("lung", .05, -.10, .36, .62, organ="lung"), Shape("heart", -.28, .25, .27, .27),
                Shape("bone", .60, .05, .08, .90), Shape("bone", -.70, 0, .03, .40)]
    ribs = [Shape("bone", s * .40, -.55 + .19 * k, .33, .03, -s * 10, alpha=.35)
            for s in (-1, 1) for k in range(6)]
    return [Shape("soft", 0, .05, .95, 1.0),
            Shape("lung", -.42, -.05, .32, .62, organ="lung", side="right"),
            Shape("lung", .42, -.05, .30, .62, organ="lung", side="left"),
            Shape("heart", .10, .35, .30, .28), Shape("heart", 0, -.30, .12, .45),
            Shape("liver", -.35, .85, .45, .25), Shape("bone", 0, 0, .06, .95, alpha=.4), *ribs,
            Shape("bone", -.35, -.72, .30, .035, 12, alpha=.6), Shape("bone", .35, -.72, .30, .035, -12, alpha=.6)]


def _abdomen(plane: str, rng: np.random.Generator) -> list[Shape]:
    if plane == "axial":
        return [Shape("fat", 0, 0, .95, .70), Shape("muscle", 0, 0, .88, .63),
                Shape("liver", -.35, -.10, .45, .38, organ="liver", side="right"),
                Shape("spleen", .52, .02, .17, .22),
                Shape("kidney", -.36, .32, .14, .20, organ="kidney", side="right"),
                Shape("kidney", .36, .32, .14, .20, organ="kidney", side="left"),
                Shape("bone", 0, .45, .11, .10), Shape("vessel", .07, .25, .06, .06),
                Shape("gas", .25, -.30, .18, .12)]
    if plane == "coronal":
        return [Shape("fat", 0, 0, .90, .96), Shape("muscle", 0, 0, .84, .90),
                Shape("lung", -.40, -.95, .30, .15), Shape("lung", .40, -.95, .30, .15),
                Shape("liver", -.35, -.45, .45, .30, organ="liver", side="right"),
                Shape("spleen", .50, -.45, .17, .22), Shape("bone", 0, .20, .08, .80),
                Shape("kidney", -.35, .15, .14, .25, organ="kidney", side="right"),
                Shape("kidney", .35, .15, .14, .25, organ="kidney", side="left")]
    if plane == "sagittal":
        return [Shape("fat", 0, 0, .70, .96), Shape("muscle", 0, 0, .65, .90),
                Shape("liver", -.15, -.45, .40, .30, organ="liver"),
                Shape("kidney", .30, .15, .14, .25, organ="kidney"),
                Shape("bone", .55, .10, .09, .85), Shape("gas", -.30, .40, .12, .10)]
    bubbles = [Shape("gas", float(rng.uniform(-.5, .5)), float(rng.uniform(.1, .6)),
                     float(rng.uniform(.04, .08)), float(rng.uniform(.03, .06)), alpha=.6) for _ in range(5)]
    return [Shape("soft", 0, 0, .95, 1.0), *bubbles,
            Shape("liver", -.35, -.55, .45, .32, organ="liver", side="right"),
            Shape("kidney", -.33, .05, .13, .22, organ="kidney", side="right"),
            Shape("kidney", .33, .05, .13, .22, organ="kidney", side="left"),
            Shape("bone", 0, 0, .06, 1.0, alpha=.6),
            Shape("bone", -.45, .80, .30, .22, alpha=.5), Shape("bone", .45, .80, .30, .22, alpha=.5)]


def anatomy(region: str, plane: str, rng: np.random.Generator) -> list[Shape]:
    """The tissues of one region and plane, each organ's size jittered by a few percent."""
    shapes = _brain(plane) if region == "brain" else (_chest if region == "chest" else _abdomen)(plane, rng)
    jittered = []
    for s in shapes:
        k = float(rng.uniform(0.94, 1.06))
        dx, dy = (float(v) for v in rng.uniform(-0.015, 0.015, 2))
        jittered.append(Shape(s.tissue, s.cx + dx, s.cy + dy, s.rx * k, s.ry * k, s.angle, s.alpha,
                              s.organ, s.side))
    return jittered


def _overlaps(shape: Shape, x: float, y: float, r: float) -> bool:
    """Whether a circle touches an (axis-aligned or rotated) ellipse, conservatively."""
    a = np.deg2rad(shape.angle)
    u, v = x - shape.cx, y - shape.cy
    u, v = np.cos(a) * u + np.sin(a) * v, -np.sin(a) * u + np.cos(a) * v
    return (u / (shape.rx + r)) ** 2 + (v / (shape.ry + r)) ** 2 < 1


def _place_lesions(organ: Shape, occluders: list[Shape], count: int, size: str,
                   rng: np.random.Generator) -> tuple[Lesion, ...] | None:
    """`count` non-touching lesions inside `organ`, clear of the opaque shapes drawn over it
    (the heart over a lung) and of the brain's midline; None if they don't fit."""
    lesions: list[Lesion] = []
    for _ in range(200):
        if len(lesions) == count:
            return tuple(lesions)
        r = float(rng.uniform(*_RADIUS[size]))
        ax, ay = organ.rx - r - _MIN_GAP, organ.ry - r - _MIN_GAP
        if ax <= 0 or ay <= 0:
            return None
        rho, phi = np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
        x, y = organ.cx + ax * rho * np.cos(phi), organ.cy + ay * rho * np.sin(phi)
        # A brain lesion must sit clearly in one hemisphere.
        if organ.organ == "brain" and organ.side and (x * (1 if organ.side == "left" else -1) < r + .1):
            continue
        if any(_overlaps(o, x, y, r + _MIN_GAP) for o in occluders):
            continue
        if all(np.hypot(x - l.x, y - l.y) > r + l.radius + _MIN_GAP for l in lesions):
            lesions.append(Lesion(float(x), float(y), r))
    return None


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw one scene: 60% carry 1-3 lesions of one kind and size inside one organ."""
    modality = str(rng.choice(MODALITIES, p=[0.4, 0.35, 0.25]))
    if modality == "x-ray":
        region, plane = str(rng.choice(["chest", "abdomen"], p=[0.7, 0.3])), "pa"
    else:
        region, plane = str(rng.choice(REGIONS)), str(rng.choice(CROSS_SECTION_PLANES))
    shapes = anatomy(region, plane, rng)
    pose = (float(rng.uniform(0.9, 1.05)), float(rng.uniform(-6, 6)),
            float(rng.uniform(-0.04, 0.04)), float(rng.uniform(-0.04, 0.04)))
    common = dict(modality=modality, plane=plane, region=region, shapes=tuple(shapes), pose=pose,
                  gain=float(rng.uniform(0.9, 1.1)), noise_seed=int(rng.integers(2**31)))
    if rng.uniform() >= 0.6:
        return Scene(**common)
    while True:
        organ_name = str(rng.choice(LESION_ORGANS[region]))
        candidates = [i for i, s in enumerate(shapes) if s.organ == organ_name]
        at = candidates[int(rng.integers(len(candidates)))]
        host, occluders = shapes[at], [s for s in shapes[at + 1:] if s.alpha == 1.0]
        side = host.side
        if organ_name == "brain" and plane != "sagittal":
            side = str(rng.choice(SIDES))
            host = Shape(host.tissue, host.cx, host.cy, host.rx, host.ry, organ="brain", side=side)
        size, kind = str(rng.choice(LESION_SIZES)), str(rng.choice(LESION_KINDS))
        count = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
        lesions = _place_lesions(host, occluders, count, size, rng)
        if lesions is not None:
            return Scene(**common, lesion_kind=kind, lesion_size=size, lesion_organ=organ_name,
                         lesion_side=side, lesions=lesions)
