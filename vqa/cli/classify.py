"""`medvqa classify`: image classification with any encoder: linear probe, fine-tuning, or CLIP zero-shot."""
from __future__ import annotations

import argparse

from .options import add_engine_arguments, command_parser, config_from_command_line

CLASSIFY_FORMATS = ("medmnist", "imagefolder", "hf")  # vqa.data.classification.CLASSIFICATION_FORMATS

EXAMPLE = """examples:
  medvqa phantom runs/phantom --images 1000
  medvqa classify --data runs/phantom/classification/medmnist/phantommodalitymnist_64.npz \\
      --encoder runs/pretrain-phantom/encoder --method probe --out runs/cls-probe
  medvqa classify --data runs/phantom/classification/medmnist/phantommodalitymnist_64.npz \\
      --method zero-shot --clip runs/pretrain-phantom/clip --out runs/cls-zero-shot
  medvqa classify --format medmnist --data path/to/medmnist --flag pathmnist --size 224 \\
      --encoder "path/to/image_encoder(resnet50).pth" --method finetune --epochs 10 --precision bf16
  medvqa classify --format medmnist --data path/to/medmnist --flag chestmnist --size 224 \\
      --method zero-shot --clip hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224
  medvqa classify --format imagefolder --data path/to/folder --encoder clip-vit-b32   # ROOT/{train,val,test}/CLASS/
  medvqa classify --format hf --data org/dataset --label-column label --encoder ...    # datasets (hub id, folder)

Metrics are MedMNIST's: accuracy and AUC (one-vs-rest; per-label for multi-label sets such as
ChestMNIST) on test, the model selected on val (probe C, fine-tuned epoch), with the majority-class
accuracy beside them. OUT gets metrics.json, report.md, run_config.json (and, fine-tuning, encoder/,
head.safetensors, labels.json, history and a resumable checkpoint)."""


def build_parser():
    from pretrain.classify import METHODS, ClassifyConfig

    d = ClassifyConfig()
    p = command_parser("medvqa classify", __doc__.split(": ", 1)[1], EXAMPLE)
    g = p.add_argument_group("data")
    g.add_argument("--format", default=d.format, choices=CLASSIFY_FORMATS,
                   help="medmnist (.npz), imagefolder (ROOT/SPLIT/CLASS/IMAGE) or hf (default: %(default)s)")
    g.add_argument("--data", default=d.data, help="a .npz file or a folder of them (medmnist), an ImageFolder root, "
                                                  "or a `datasets` folder / hub id (default: %(default)s)")
    g.add_argument("--flag", default=None, help="medmnist: the set in a folder of npz files (pathmnist, ...)")
    g.add_argument("--size", type=int, default=None, help="medmnist: 28, 64, 128 or 224 when a folder holds several")
    g.add_argument("--labels", default=None, help="medmnist: label names as JSON (MedMNIST's INFO entry, or the whole "
                                                  "INFO); default: FLAG.json beside the npz, else medmnist's INFO")
    g.add_argument("--image-column", default=None, help="hf: the image column (default: image / img)")
    g.add_argument("--label-column", default=None, help="hf: the label column (default: label / labels / class)")
    g.add_argument("--cache-dir", default=None, help="feature cache root (default: $MEDVQA_CACHE/features)")
    g = p.add_argument_group("method")
    g.add_argument("--method", default=d.method, choices=METHODS, help="default: %(default)s")
    g.add_argument("--encoder", default=d.encoder, help="probe / finetune: any encoder spelling (`medvqa encoders`); "
                                                        "default: %(default)s")
    g.add_argument("--encoder-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="override of a registered encoder's config, e.g. image_size=224 (repeatable)")
    g.add_argument("--clip", default=None, help="zero-shot: a CLIP model: `medvqa pretrain`'s OUT/clip, a CLIPModel "
                                                "folder or hub id, hf-hub:, local-dir:, open_clip:, a .pt file")
    g.add_argument("--prompts", default=None, help="zero-shot prompt JSON (default: pretrain/classify_prompts.json)")
    g.add_argument("--prompt-set", default=None, help="the entry of the prompt file (default: the dataset's name, "
                                                      "else 'default')")
    g.add_argument("--features", default=d.features, choices=["pooled", "grid"],
                   help="probe: the pooled vector or the flattened grid (default: %(default)s)")
    g.add_argument("--select", default=d.select, choices=["auc", "accuracy"],
                   help="the val metric that picks the probe's C and the fine-tuned epoch (default: %(default)s)")
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--encoder-lr", type=float, default=None, help="the encoder's learning rate (default: --lr / 10)")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=False,
                   help="small affine, resized crop, intensity jitter (never a flip)")
    g.add_argument("--image-cache", default=d.image_cache, choices=["auto", "ram", "stream"],
                   help="ram: decode each image once into a uint8 table; stream: decode per batch; auto: ram when "
                        "the table fits --cache-limit-gb")
    g.add_argument("--cache-limit-gb", type=float, default=d.cache_limit_gb,
                   help="the largest image table --image-cache auto keeps in RAM (default: %(default)s)")
    g.add_argument("--workers", type=int, default=d.workers, help="DataLoader processes decoding images")
    add_engine_arguments(p, d)
    return p


def main(argv: list[str] | None = None) -> int:
    from pretrain.classify import ClassifyConfig, classify, markdown

    cfg = config_from_command_line(ClassifyConfig, build_parser(), argv)
    report = classify(cfg)
    if "test" not in report:  # --stop-after, or not the main process
        return 0
    print(markdown(report))
    print(f"wrote {cfg.out}/metrics.json and report.md")
    return 0
