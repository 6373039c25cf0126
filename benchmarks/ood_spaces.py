"""Which feature space tells photographs from radiology images: the out-of-scope detector (vqa.ood) fitted in each.

    .venv/bin/python benchmarks/ood_spaces.py --data ../shared/data/vqa-rad --threads 1 \\
        --encoders runs/real/mevf/encoder runs/real/vqa/a-qcr-finetune-train-200ep-qcr-schedule/bundle/encoder \\
        efficientnet-lite0-imagenet

For each encoder (a registered name or a saved folder, a bundle's `encoder/` included): the detector that training
fits (Mahalanobis distance under a Ledoit-Wolf covariance, threshold at the 99% quantile of out-of-fold scores) is
fitted on the pooled features of the training split's images, then scores the test split's images against
scikit-image's sample photographs: the AUROC and the share of each flagged. An encoder with an autoencoder
(MEVF's) also gets its reconstruction error as a score, the classic alternative.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch


def _scores(encoder, images: list, batch: int = 32) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(pooled features, reconstruction error or None) of `images`."""
    from encoders.mevf import AutoencoderReconstructionLoss
    from encoders.pixels import preprocess

    pooled, errors, reconstruction_error = [], [], AutoencoderReconstructionLoss()
    with torch.no_grad():
        for s in range(0, len(images), batch):
            pixels = preprocess(images[s:s + batch], encoder)
            out = encoder(pixels)
            pooled.append(out["pooled"].float())
            if "reconstruction" in out:  # MEVF's own loss, image by image
                errors += [reconstruction_error(r[None].float(), x[None])
                           for r, x in zip(out["reconstruction"], pixels)]
    return torch.cat(pooled), torch.stack(errors) if errors else None


def _auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score([0] * len(inside) + [1] * len(outside), np.r_[inside, outside]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="a VQA-RAD folder (its train and test images)")
    p.add_argument("--encoders", nargs="+", required=True, help="registered names or saved encoder folders")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from encoders import create_encoder
    from vqa.data import load_vqa_rad
    from vqa.ood import OutOfScopeDetector, photographs

    train = list(dict.fromkeys(r.image for r in load_vqa_rad(args.data, "train")))
    test = list(dict.fromkeys(r.image for r in load_vqa_rad(args.data, "test")))
    photos = photographs()
    print(f"{len(train)} training images fit each detector; {len(test)} test images against "
          f"{len(photos)} photographs\n")
    print("| encoder | score | AUROC | photographs flagged | test images flagged |")
    print("|---|---|---|---|---|")
    for name in args.encoders:
        encoder = create_encoder(name).eval()
        (fit, fit_err), (inside, inside_err), (outside, outside_err) = (
            _scores(encoder, images) for images in (train, test, photos))
        detector = OutOfScopeDetector.fit(fit)
        a, b = detector.score(inside).numpy(), detector.score(outside).numpy()
        print(f"| {name} | Mahalanobis, pooled ({fit.shape[1]}-d) | {_auroc(a, b):.3f} | "
              f"{(b > detector.threshold).mean():.0%} | {(a > detector.threshold).mean():.0%} |")
        if fit_err is not None:
            limit = float(np.quantile(fit_err.numpy(), 0.99))  # in-sample: the autoencoder saw these images
            a, b = inside_err.numpy(), outside_err.numpy()
            print(f"| {name} | reconstruction error | {_auroc(a, b):.3f} | {(b > limit).mean():.0%} | "
                  f"{(a > limit).mean():.0%} |")


if __name__ == "__main__":
    main()
