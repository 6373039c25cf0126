"""Calibrate a trained bundle again (`medvqa calibrate`), on the validation split it recorded.

    bundle = recalibrate(RecalibrateConfig(bundle="runs/qcr/bundle", format="vqa-rad", data="path/to/vqa-rad"))

For bundles trained before trust scores (or before calibration): the same temperatures, trust
memory and abstention evidence `medvqa train` fits after training, computed from the bundle's
own answers to its training and validation questions, which are rebuilt from what the bundle
records and checked against it (as `medvqa ensemble` does). The network is not touched. Written
into the bundle (trust.safetensors first, then calibration.json: a stopped run leaves the old
calibration valid) or, with `out`, into a copy. Refused for a refit bundle (its validation
questions are training questions now) and for an ensemble (`medvqa ensemble` calibrates it).
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .bundle import Bundle, load as load_bundle
from .calibration import CALIBRATION_FILE, Calibration
from .data.record import Record
from .errors import DataError
from .inference import ANSWER_PRECISION
from .io import atomic_dir, atomic_write_json
from .ood import OutOfScopeDetector, detector_encoder, fit_detector
from .target_risk import TargetRisk
from .trust import TRUST_FILE, TrustScorer, asked_about, image_ids
from .training.precision import resolve_device

log = logging.getLogger(__name__)


@dataclass
class RecalibrateConfig:
    bundle: str  # a bundle folder (or a Hub id, with `out`)
    format: str = "vqa-rad"  # the bundle's training data, to rebuild its training and validation splits
    data: str = "runs/phantom/vqa-rad"
    out: str | None = None  # None: the bundle itself; else OUT/bundle, a calibrated copy
    # The validation split, where the bundle does not record it (bundles from before `--val-seed`)
    val_split: str | None = None
    val_fraction: float | None = None
    val_by: str | None = None
    val_seed: int | None = None
    target_risk: TargetRisk | float | str | None = None  # default: the bundle's (or 10 %)
    # fit the out-of-scope detector again, on the training images, in this space ("same": the model's image encoder;
    # or an encoder name, vqa.ood); None keeps the bundle's detector
    ood_encoder: str | None = None
    device: str = "auto"  # calibrated in fp32, the precision the bundle answers in (ANSWER_PRECISION)
    cache_dir: str | None = None
    progress: bool = True


def recalibrate(cfg: RecalibrateConfig) -> Path:
    """Fit the bundle's calibration (and trust memory, where its head has one) again; returns the bundle written."""
    from .ensemble import recorded_splits
    from .evaluate import predict_records
    from .hub import resolve_bundle
    from .model_card import write_card

    device = resolve_device(cfg.device)
    path = Path(resolve_bundle(cfg.bundle))
    if cfg.out is None and not Path(cfg.bundle).is_dir():
        raise DataError(f"{cfg.bundle}: a Hub bundle is calibrated into a copy: pass --out")
    bundle = load_bundle(path, device)
    head = bundle.model.head
    if "refit" in bundle.metrics:
        raise DataError(f"{path}: trained again on its validation questions (--refit): none is left to calibrate on")
    if not head.trainable:
        raise DataError(f"{path}: an ensemble ({head.name}); `medvqa ensemble` calibrates it on its members' split")
    risk = TargetRisk.given_or(cfg.target_risk, bundle.calibration and bundle.calibration.target_risk)
    given = {"split": cfg.val_split, "fraction": cfg.val_fraction, "by": cfg.val_by, "seed": cfg.val_seed}
    train, val, how = recorded_splits(path, bundle, cfg.format, cfg.data,
                                      {k: v for k, v in given.items() if v is not None})
    detector = None
    if cfg.ood_encoder is not None:
        detector = refit_detector(bundle, train, cfg.ood_encoder, device, cfg.cache_dir, cfg.progress)
    trust = trust_memory(bundle, train, device, cfg.cache_dir, cfg.progress)
    log.info("calibrating on validation %s (%d questions)", how, len(val))
    preds = predict_records(bundle, val, device, ANSWER_PRECISION, cfg.cache_dir, cfg.progress)
    correct = [p == r.answer for p, r in zip(preds.answers, val)]
    calibration = Calibration.fit(preds.logits, preds.branches(), correct, f"validation {how} (medvqa calibrate)",
                                  risk, trust=trust, fused=preds.fused, **asked_about(trust, val, cfg.progress))
    if cfg.out is None:
        _write(calibration, detector, path)
        target = path
    else:
        with atomic_dir(Path(cfg.out) / "bundle", overwrite=True) as tmp:
            shutil.copytree(path, tmp, dirs_exist_ok=True)
            _write(calibration, detector, tmp)
        target = Path(cfg.out) / "bundle"
    _refresh_export(target)
    for stale in sorted(target.glob("eval-*/metrics.json")):
        log.warning("%s measured the calibration this replaced: run `medvqa eval` again for its abstention figures "
                    "(the model card leaves them out until then)", stale.parent)
    write_card(target)
    log.info("%s: calibrated (temperatures %s%s)", target, {b: round(t, 3) for b, t in calibration.temperatures.items()},
             f"; trust weights {calibration.trust_weights}" if calibration.uses_trust else "")
    return target


def trust_memory(bundle: Bundle, train: Sequence[Record], device, cache_dir: str | None = None,
                 progress: bool = True, familiarity: bool = True) -> TrustScorer | None:
    """The bundle's trust memory: its fused vectors of its training questions, with their answers, and (with
    `familiarity`) what was asked about each training image (None for a head without fused vectors)."""
    from .evaluate import predict_records

    if not bundle.model.head.has_fused_output:
        return None
    log.info("trust memory: the bundle's fused vectors of its %d training questions", len(train))
    fused = predict_records(bundle, train, device, ANSWER_PRECISION, cache_dir, progress).fused
    answers = torch.tensor([bundle.answers.index(r.answer) for r in train])
    if not familiarity:  # trust scores alone: no image is read for its id
        return TrustScorer.fit(fused, answers)
    return TrustScorer.fit(fused, answers, questions=[r.question for r in train],
                           image_ids=image_ids([r.image for r in train], progress))



def refit_detector(bundle: Bundle, train: Sequence[Record], space: str, device, cache_dir: str | None = None,
                   progress: bool = True) -> OutOfScopeDetector | None:
    """The bundle's out-of-scope detector fitted again on its training images, in `space` (--ood-encoder)."""
    from .batches import unique_images
    from .features import feature_table

    images = unique_images([r.image for r in train])[0]
    model_features = None
    encoder = detector_encoder(space, bundle.model.encoder)
    if encoder is None:
        model_features = feature_table(bundle.model.encoder, images, cache_dir, device=device, progress=progress)
    return fit_detector(bundle.model.encoder, images, model_features, encoder, device, cache_dir, progress)


def _refresh_export(bundle: Path) -> None:
    """An ONNX export in the bundle (`onnx/`) carries copies of the calibration, the trust memory and the detector
    (its graph too, in a space of its own): exported again, or the onnx runtime would answer with the old ones."""
    from .onnx_export import export_onnx

    folder = bundle / "onnx"
    if not folder.is_dir():
        return
    try:
        export_onnx(bundle, folder, overwrite=True)
    except DataError as e:  # onnx not installed here: better no export than one that abstains otherwise
        shutil.rmtree(folder)
        log.warning("%s: removed the ONNX export, made with the old calibration (%s); export it again with "
                    "`medvqa export onnx`", bundle, e)


def _write(calibration: Calibration, detector: OutOfScopeDetector | None, folder: Path) -> None:
    """The memory before the calibration that names it; a stale memory removed only after; then the detector."""
    if calibration.uses_trust:
        calibration.trust.save(folder)
    atomic_write_json(folder / CALIBRATION_FILE, calibration.to_dict())
    if not calibration.uses_trust:
        (folder / TRUST_FILE).unlink(missing_ok=True)
    if detector is not None:
        detector.save(folder)
