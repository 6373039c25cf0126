"""`medvqa train`: train a VQA head on a frozen (or fine-tuned) image encoder, select on validation, write a bundle."""
from __future__ import annotations

import argparse
import json
import sys
import time

from .options import (add_dataset_arguments, add_engine_arguments, add_format_argument, add_ood_encoder_argument,
                      add_target_risk_argument, add_weights_dtype_argument, command_parser, config_from_command_line)

EXAMPLE = """examples:
  medvqa train --format vqa-rad --data runs/phantom/vqa-rad --head mevf-ban --out runs/ban
  medvqa train --format slake --data path/to/Slake1.0 --encoder pubmedclip-vit-b32 --head qcr \\
      --precision bf16 --epochs 40 --out runs/slake-qcr
  medvqa import mevf path/to/mevf runs/mevf       # MEVF's released image side and GloVe vectors
  medvqa train --format vqa-rad --data path/to/vqa-rad --encoder runs/mevf/encoder \\
      --encoder-mode finetune --glove runs/mevf/glove_300d.txt --answers path/to/vqa-rad/answer_all_list.json
  # QCR's released code's recipe on MEVF's image side: its loss, Adamax at 0.002 held for 200 epochs, batch 64
  medvqa train --format vqa-rad --data path/to/vqa-rad --val-by question --encoder runs/mevf/encoder \\
      --encoder-mode finetune --glove runs/mevf/glove_300d.txt --head qcr --head-arg hidden_dim=1024 \\
      --head-arg separate_router=true --question-dim 1024 --loss bce-mean --optimizer adamax --lr 0.002 \\
      --lr-schedule constant --warmup-epochs 0 --batch-size 64 --epochs 200 --out runs/qcr-code
  # MEVF's released code's recipe: its 600-d word embedding, Adamax from 0.005 (x0.5 to x2 over 4 epochs, x0.75
  # at epochs 11-19), clipped at 0.25, batch 32; its code divides the autoencoder's loss (x 0.001) by the batch too
  medvqa train --format vqa-rad --data path/to/vqa-rad --encoder runs/mevf/encoder --encoder-mode finetune \\
      --glove runs/mevf/glove_tfidf_600d.txt --embed-dim 600 --head mevf-ban --head-arg hidden_dim=1024 \\
      --question-dim 1024 --loss bce --optimizer adamax --lr 0.005 --lr-schedule mevf-step --warmup-epochs 0 \\
      --clip-norm 0.25 --batch-size 32 --aux-weight 3.125e-5 --epochs 20 --out runs/mevf-code
  # the README's VQA-RAD recipe, one of its three bagged runs (--seed 0, 1, 2; then `medvqa ensemble --bagging`)
  medvqa train --format vqa-rad --data path/to/vqa-rad --val-by question --answers train \\
      --encoder efficientnet-lite0-imagenet --question-encoder minilm --question-lr 5e-5 \\
      --head fusion-transformer-qcr --head-arg hidden_dim=256 --head-arg layers=2 --head-arg attention_heads=4 \\
      --optimizer adamw --lr 5e-4 --weight-decay 0.01 --loss ce --epochs 20 --seed 0 --out runs/vqa-rad-transfer-0
  medvqa train ... --ood-encoder efficientnet-lite0-imagenet   # out-of-scope images judged in ImageNet features
  medvqa train ... --resume latest        # continue OUT/checkpoint.pt after a stop
  medvqa train --config runs/ban/run_config.json --seed 1 --out runs/ban-seed1   # rerun a recorded run, one change
  medvqa train ... --refit --resume latest   # a finished run: train again on train + validation for its epoch
  torchrun --nproc_per_node 2 -m vqa.cli train ...   # DDP; --batch-size is per process

OUT gets run_config.json, history.json/.csv, checkpoint.pt (resumable) and bundle/
(the model chosen on validation, for `medvqa eval`, `predict` and `demo`)."""


def build_parser():
    from heads.losses import LOSS_KINDS

    from ..train import TrainConfig

    d = TrainConfig()
    p = command_parser("medvqa train", __doc__.split(": ", 1)[1], EXAMPLE)
    g = p.add_argument_group("data")
    add_format_argument(g, d.format)
    add_dataset_arguments(g, data_default=d.data)
    g.add_argument("--train-split", default=d.train_split)
    g.add_argument("--val-split", default=d.val_split, help="split name, 'carved', or 'auto' (default)")
    g.add_argument("--val-fraction", type=float, default=d.val_fraction)
    g.add_argument("--val-by", default=d.val_by, choices=["image", "question"],
                   help="carve validation by image (default) or by question (as VQA-RAD splits train/test)")
    g.add_argument("--val-seed", type=int, default=None,
                   help="seed of the validation carve (default: --seed); the members of an ensemble share one, "
                        "so that `medvqa ensemble` can calibrate them together on it")
    g.add_argument("--strict", action=argparse.BooleanOptionalAction, default=False,
                   help="refuse a question with an empty question or answer (default: skip it with a warning)")
    g.add_argument("--answers", default=d.answers, help="'train' or a candidate list JSON (MEVF protocol)")
    g.add_argument("--cache-dir", default=None, help="feature cache root (default: $MEDVQA_CACHE/features)")
    g = p.add_argument_group("model")
    g.add_argument("--encoder", default=d.encoder, help="encoder name, folder or hub id (default: %(default)s)")
    g.add_argument("--encoder-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="override of a registered encoder's config, e.g. image_size=224 (repeatable)")
    g.add_argument("--encoder-mode", default=d.encoder_mode, choices=["frozen", "finetune"])
    g.add_argument("--encoder-lr", type=float, default=None,
                   help="learning rate of the image encoder when fine-tuning (default: --lr)")
    g.add_argument("--freeze-epochs", type=int, default=0,
                   help="fine-tuning: a warm start of N epochs with the encoder frozen, on cached features")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=False,
                   help="fine-tuning: random affine, resized crop and intensity jitter per image (never a flip)")
    g.add_argument("--encoder-norm", default=d.encoder_norm, choices=["train", "frozen"],
                   help="fine-tuning: update the encoder's BatchNorm statistics on the training batches (train), or "
                        "keep the pretrained ones while the weights learn (frozen) (default: %(default)s)")
    g.add_argument("--feature-views", type=int, default=d.feature_views, metavar="N",
                   help="frozen encoder: also cache N augmented copies of each training image (--augment's changes); "
                        "each epoch a question reads its image or one of them at random (default: %(default)s)")
    g.add_argument("--image-features", default=d.image_features, choices=["grid", "pooled"],
                   help="regions the head attends over: the encoder's grid, or its pooled vector (PubMedCLIP)")
    g.add_argument("--head", default=d.head, help="mevf-ban | mevf-san | qcr | mc-ban | fusion-transformer | "
                                                  "fusion-transformer-qcr | fusion-transformer-mc (default: %(default)s)")
    g.add_argument("--head-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="a field of the head's config, e.g. hidden_dim=512 (repeatable)")
    g.add_argument("--question-encoder", default=d.question_encoder,
                   help="gru (word embeddings + GRU, MEVF), or a text tower: minilm, a Hugging Face folder or hub id "
                        "such as microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract (default: %(default)s)")
    g.add_argument("--question-mode", default=d.question_mode, choices=["finetune", "frozen"],
                   help="a text tower: train it (with --question-lr) or keep it fixed (default: %(default)s)")
    g.add_argument("--question-lr", type=float, default=None, help="learning rate of a text tower (default: --lr)")
    g.add_argument("--embed-dim", type=int, default=d.embed_dim)
    g.add_argument("--question-dim", type=int, default=d.question_dim)
    g.add_argument("--glove", default=None, help="GloVe text file (e.g. `medvqa import mevf`'s glove_300d.txt) "
                                                 "or a .npy aligned with the vocabulary")
    g.add_argument("--max-len", type=int, default=None,
                   help="question tokens read (default: 12 words for the GRU, 32 tokens for a text tower)")
    g.add_argument("--loss", default=None, choices=LOSS_KINDS,
                   help="bce: MEVF's per-answer sigmoid loss, summed over answers; bce-mean: the same averaged over "
                        "(question, answer) pairs, per answer branch (QCR's code); ce: softmax cross-entropy "
                        "(default: the head's own)")
    g.add_argument("--aux-weight", type=float, default=d.aux_weight,
                   help="weight of the encoder's auxiliary loss when fine-tuning (MEVF's autoencoder; default: "
                        "%(default)s)")
    g.add_argument("--refit", action=argparse.BooleanOptionalAction, default=False,
                   help="after validation chose the epoch, train again on train + validation for that many epochs of "
                        "the same schedule and keep that model (calibration: the validation run's, a proxy)")
    add_target_risk_argument(g, f"{d.target_risk}; `predict --target-risk` overrides", default=str(d.target_risk))
    add_ood_encoder_argument(g, "%(default)s", default=d.ood_encoder)
    add_weights_dtype_argument(g, "validation and calibration")
    g = add_engine_arguments(p, d)["optimisation"]
    g.add_argument("--optimizer", default=d.optimizer, choices=["adamax", "adamw"])
    return p


def main(argv: list[str] | None = None) -> int:
    from ..train import TrainConfig, train

    cfg = config_from_command_line(TrainConfig, build_parser(), argv)
    started = time.time()
    bundle = train(cfg)
    metrics = bundle / "metrics.json"
    # --stop-after ended it (a bundle there is an earlier run's, not this one's), or not the main process
    if not metrics.is_file() or metrics.stat().st_mtime < started:
        if cfg.stop_after is not None:
            print(f"medvqa train: stopped after {cfg.stop_after} epoch(s) of this call (--stop-after); the checkpoint "
                  f"in {cfg.out} continues with --resume latest", file=sys.stderr)
        return 0
    print(json.dumps({"bundle": str(bundle), **json.loads((bundle / "metrics.json").read_text())["validation"]},
                     indent=2))
    return 0
