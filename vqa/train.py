"""`medvqa train`: fit a VQA head on a (usually frozen) image encoder, select on validation, write a bundle.

With a frozen encoder every image is encoded once through the feature cache and
the head trains on cached features. `--encoder-mode finetune` trains through the
encoder (MEVF's recipe, with its autoencoder loss when the encoder has one).
"""
from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .answers import AnswerVocab
from .batches import QuestionTensors, encode_questions, unique_images
from .bundle import save as save_bundle
from .checkpoint import (CHECKPOINT_NAME, check_compatible, load_checkpoint, resolve_resume, restore_optimization,
                         save_checkpoint)
from .data import carve_validation, load_records
from .data.record import CLOSED, OPEN, Record
from .errors import DataError
from .features import feature_table, pixel_table
from .inference import model_inputs, predict, run_model
from .io import atomic_write_json
from .metrics import choice_metrics, vqa_metrics
from .model import VQAModel
from .precision import backward_step, check_precision, get_autocast, make_grad_scaler, resolve_device
from .runtime import parse_key_values, seed_everything, write_run_config
from .text import WordVocab

log = logging.getLogger(__name__)
_IDENTITY = ("dataset", "data", "encoder", "encoder_args", "encoder_mode", "image_features", "head", "head_args", "loss", "answers", "seed",
             "val_split", "val_fraction", "val_by")


@dataclass
class TrainConfig:
    # data
    dataset: str = "vqa-rad"  # on-disk format: vqa-rad | slake | pmc-vqa | hf
    data: str = "runs/phantom/vqa-rad"
    train_split: str = "train"
    val_split: str = "auto"  # a split name, or "auto": SLAKE's validate, else carved from train
    val_fraction: float = 0.1  # share of train images (or questions) carved out for validation
    val_by: str = "image"  # carve by image, or by question (VQA-RAD's own split is by question)
    lang: str = "en"
    answers: str = "train"  # "train" (train-only vocabulary) or a candidate list JSON (MEVF's)
    # model
    encoder: str = "clip-vit-tiny"  # registered name, save_pretrained folder, or hub id
    encoder_args: dict = field(default_factory=dict)  # overrides for a registered encoder, e.g. image_size
    encoder_mode: str = "frozen"  # frozen (cached features) | finetune (through the encoder)
    image_features: str = "grid"  # grid (regions, attention maps) | pooled (one vector, as PubMedCLIP)
    head: str = "mevf-ban"
    head_args: dict = field(default_factory=dict)  # fields of the head's config dataclass
    embed_dim: int = 300  # word embeddings (GloVe-300 as MEVF)
    question_dim: int = 1024  # question GRU hidden size
    glove: str | None = None  # GloVe text file, or a .npy aligned with the vocabulary
    max_len: int = 12  # question tokens (MEVF: 12)
    # optimisation
    epochs: int = 20
    batch_size: int = 64
    lr: float = 2e-3
    optimizer: str = "adamax"  # adamax (MEVF, QCR) | adamw
    weight_decay: float = 0.0
    warmup_epochs: float = 1.0
    clip_norm: float = 0.25  # MEVF clips the gradient norm at 0.25
    loss: str = "bce"  # bce (MEVF: sigmoid per answer, summed) | ce (softmax cross-entropy)
    ae_weight: float = 1e-3  # MEVF's autoencoder reconstruction loss weight (finetune only)
    precision: str = "fp32"
    device: str = "auto"
    compile: bool = False
    threads: int | None = None  # CPU threads for torch (default: torch's choice, one per core)
    seed: int = 0
    # outputs
    out: str = "runs/vqa"
    cache_dir: str | None = None
    resume: str | None = None
    progress: bool = True


@dataclass
class Split:
    records: list[Record]
    questions: QuestionTensors
    images: object  # feature table dict (frozen) or pixel tensor (finetune)


def _load_splits(cfg: TrainConfig) -> tuple[list[Record], list[Record], str]:
    kwargs = {"lang": cfg.lang} if cfg.dataset in ("slake", "hf") else {}
    train = load_records(cfg.dataset, cfg.data, cfg.train_split, **kwargs)
    if not train:
        raise DataError(f"{cfg.data}: split {cfg.train_split!r} has no questions")
    val_split = cfg.val_split
    if val_split == "auto":
        val_split = "validate" if cfg.dataset == "slake" else "carved"
    if val_split == "carved":
        train, val = carve_validation(train, cfg.val_fraction, cfg.seed, by=cfg.val_by)
        how = f"carved from {cfg.train_split} ({cfg.val_fraction:.0%} of {cfg.val_by}s, seed {cfg.seed})"
    else:
        val, how = load_records(cfg.dataset, cfg.data, val_split, **kwargs), f"split {val_split!r}"
        if val_split == "test":
            log.warning("model selection on the test split (as MEVF/QCR's code does): test scores will be optimistic")
    log.info("data: %d train / %d validation questions (validation %s)", len(train), len(val), how)
    return train, val, how


def _vocabularies(cfg: TrainConfig, train: list[Record]) -> tuple[WordVocab, AnswerVocab]:
    words = WordVocab.build([r.question for r in train] + [c for r in train for c in r.choices])
    if cfg.answers == "train":
        answers = AnswerVocab.from_records(train)
    else:
        answers = AnswerVocab.from_candidates(cfg.answers, train)
    log.info("vocabularies: %d question words, %d answers (%s)", len(words), len(answers), answers.protocol)
    return words, answers


def _build_model(cfg: TrainConfig, words: WordVocab, answers: AnswerVocab) -> VQAModel:
    from encoders import create_encoder
    from heads import QuestionEncoderConfig, create_head, load_glove

    encoder = create_encoder(cfg.encoder, **cfg.encoder_args)
    head_args = dict(cfg.head_args)
    if cfg.head == "qcr":
        head_args.setdefault("closed_mask", answers.type_mask(CLOSED))
        head_args.setdefault("open_mask", answers.type_mask(OPEN))
    question = QuestionEncoderConfig(vocab_size=len(words), embed_dim=cfg.embed_dim, hidden_dim=cfg.question_dim)
    head = create_head(cfg.head, feature_dim=encoder.feature_dim, vocab_sizes={"answers": len(answers)},
                       question_encoder=question, **head_args)
    if cfg.glove:
        head.question_encoder.init_embeddings(load_glove(cfg.glove, words.words, cfg.embed_dim))
    if cfg.encoder_mode == "frozen":
        encoder.freeze()
    elif cfg.encoder_mode != "finetune":
        raise DataError(f"--encoder-mode {cfg.encoder_mode!r}: expected 'frozen' or 'finetune'")
    return VQAModel(encoder, head, cfg.image_features)


def _make_split(cfg: TrainConfig, model: VQAModel, records: list[Record], words: WordVocab,
                answers: AnswerVocab, device: torch.device) -> Split:
    images, rows = unique_images(records)
    questions = encode_questions(records, rows, words, answers, cfg.max_len)
    if cfg.encoder_mode == "frozen":
        table = feature_table(model.encoder, images, cfg.cache_dir, device=device, progress=cfg.progress)
    else:
        table = pixel_table(model.encoder, images, progress=cfg.progress)
    return Split(records, questions, table)


def evaluate_split(model: VQAModel, split: Split, answers: AnswerVocab, device: torch.device,
                   precision: str) -> dict:
    """Accuracy metrics of `model` on a split (multiple-choice accuracy for choice questions)."""
    preds = predict(model, split.questions, split.images, split.records, answers, device, precision)
    if split.questions.choice_tokens is not None:
        return choice_metrics(split.records, preds.answers)
    return vqa_metrics(split.records, preds.answers, preds.types)


def _lr_lambda(cfg: TrainConfig, steps_per_epoch: int):
    warmup, total = max(1, int(cfg.warmup_epochs * steps_per_epoch)), max(1, cfg.epochs * steps_per_epoch)

    def factor(step: int) -> float:  # linear warmup, then cosine decay to 0
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return factor


def _optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamax":
        return torch.optim.Adamax(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise DataError(f"--optimizer {cfg.optimizer!r}: expected 'adamax' or 'adamw'")


def train_one_epoch(model, loss_fn, ae_loss, split: Split, optimizer, scheduler, scaler, cfg: TrainConfig,
                    epoch: int, device: torch.device) -> dict:
    """One pass over the training questions, in an order fixed by (seed, epoch) so resuming repeats it."""
    model.train()
    generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    total, seen, started = 0.0, 0, time.perf_counter()
    params = [p for p in model.parameters() if p.requires_grad]
    n_batches = math.ceil(len(split.questions) / cfg.batch_size)
    bar = tqdm(split.questions.batches(cfg.batch_size, shuffle=True, generator=generator), total=n_batches,
               desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress, leave=False)
    for batch in bar:
        image_in, kwargs = model_inputs(batch, split.images, device)
        with get_autocast(cfg.precision, device):
            out = run_model(model, image_in, batch["tokens"].to(device), batch["lengths"].to(device), **kwargs)
        losses = loss_fn(out, batch["answers"].to(device), batch["types"].to(device))
        loss = losses["loss"]
        if ae_loss is not None and "reconstruction" in out:
            loss = loss + ae_loss(out["reconstruction"].float(), image_in)
        backward_step(loss, optimizer, scaler, params, cfg.clip_norm)
        scheduler.step()
        total += float(loss.detach()) * len(batch["rows"])
        seen += len(batch["rows"])
        bar.set_postfix(loss=f"{total / seen:.3f}")
    return {"loss": total / max(seen, 1), "seconds": time.perf_counter() - started}


def _resume_state(cfg: TrainConfig, model, optimizer, scheduler, scaler) -> tuple[int, dict]:
    """Restore a checkpoint if `--resume` found one; returns (first epoch to run, saved progress)."""
    path = resolve_resume(cfg.resume, cfg.out)
    if path is None:
        return 0, {"history": [], "best": None, "best_state": None}
    state = load_checkpoint(path)
    check_compatible(state["config"], asdict(cfg), _IDENTITY, path)
    model.head.load_state_dict(state["head"])
    if "encoder" in state:
        model.encoder.load_state_dict(state["encoder"])
    restore_optimization(state, optimizer, scheduler, scaler)
    log.info("resumed from %s after epoch %d", path, state["epoch"] + 1)
    progress = {"history": json.loads(state["history"]), "best": json.loads(state["best"]),
                "best_state": state.get("best_head")}
    return state["epoch"] + 1, progress


def _checkpoint(cfg, model, optimizer, scheduler, scaler, epoch: int, progress: dict) -> None:
    state = {
        "epoch": epoch, "config": asdict(cfg), "head": model.head.state_dict(),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(),
        "history": json.dumps(progress["history"]), "best": json.dumps(progress["best"]),
    }
    if progress["best_state"] is not None:
        state["best_head"] = progress["best_state"]
    if cfg.encoder_mode == "finetune":
        state["encoder"] = model.encoder.state_dict()
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    save_checkpoint(state, Path(cfg.out) / CHECKPOINT_NAME)


def train(cfg: TrainConfig) -> Path:
    """Train, pick the best epoch on validation, and write OUT/bundle; returns the bundle path."""
    from heads import loss_for_head

    device = resolve_device(cfg.device)
    check_precision(cfg.precision, device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)  # on shared cores, fewer threads than cores is faster
    seed_everything(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_run_config(cfg, out)
    train_records, val_records, val_how = _load_splits(cfg)
    words, answers = _vocabularies(cfg, train_records)
    model = _build_model(cfg, words, answers).to(device)
    train_split = _make_split(cfg, model, train_records, words, answers, device)
    val_split = _make_split(cfg, model, val_records, words, answers, device)
    if cfg.loss not in ("bce", "ce"):
        raise DataError(f"--loss {cfg.loss!r}: expected 'bce' or 'ce'")
    loss_fn = (loss_for_head(model.head) if model.head.needs_choices
               else loss_for_head(model.head, kind=cfg.loss)).to(device)
    ae_loss = None
    if cfg.encoder_mode == "finetune" and getattr(model.encoder, "family", "") == "mevf":
        from encoders import AutoencoderReconstructionLoss

        ae_loss = AutoencoderReconstructionLoss(cfg.ae_weight)
    optimizer = _optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
    steps = math.ceil(len(train_split.questions) / cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, steps))
    scaler = make_grad_scaler(cfg.precision, device)
    start, progress = _resume_state(cfg, model, optimizer, scheduler, scaler)
    step_model = torch.compile(model) if cfg.compile else model
    for epoch in range(start, cfg.epochs):
        stats = train_one_epoch(step_model, loss_fn, ae_loss, train_split, optimizer, scheduler, scaler, cfg,
                                epoch, device)
        val = evaluate_split(model, val_split, answers, device, cfg.precision)
        row = {"epoch": epoch + 1, **stats, "val_overall": val["overall"], "val_closed": val.get("closed"),
               "val_open": val.get("open")}
        progress["history"].append(row)
        if progress["best"] is None or val["overall"] > progress["best"]["overall"]:
            progress["best"] = {"epoch": epoch + 1, **val}
            progress["best_state"] = copy.deepcopy(model.head.state_dict())
        log.info("epoch %d: loss %.4f, %.1fs, validation overall %.4f (best %.4f at epoch %d)", epoch + 1,
                 stats["loss"], stats["seconds"], val["overall"], progress["best"]["overall"],
                 progress["best"]["epoch"])
        atomic_write_json(out / "history.json", progress["history"])
        _checkpoint(cfg, model, optimizer, scheduler, scaler, epoch, progress)
    if progress["best_state"] is not None:
        model.head.load_state_dict(progress["best_state"])
    metrics = {"validation": progress["best"], "best_epoch": (progress["best"] or {}).get("epoch"),
               "history": progress["history"],
               "protocol": {"answers": answers.protocol, "validation": val_how,
                            "model_selection": _selection(cfg)}}
    return save_bundle(model, out / "bundle", answers=answers, words=words, metrics=metrics, max_len=cfg.max_len,
                       extra={"dataset": {"format": cfg.dataset, "train_split": cfg.train_split},
                              "training": {"loss": cfg.loss}})


def _selection(cfg: TrainConfig) -> str:
    if cfg.val_split == "test":
        return "best overall accuracy on the test split itself (the reference code's protocol; optimistic)"
    return "best validation overall accuracy (never test)"


EXAMPLE = """examples:
  medvqa train --dataset vqa-rad --data runs/phantom/vqa-rad --head mevf-ban --out runs/ban
  medvqa train --dataset slake --data path/to/Slake1.0 --encoder pubmedclip-vit-b32 --head qcr \\
      --precision bf16 --epochs 40 --out runs/slake-qcr
  medvqa train --dataset vqa-rad --data ../shared/data/vqa-rad --encoder runs/mevf/encoder \\
      --encoder-mode finetune --glove runs/mevf/glove.npy --answers ../shared/data/vqa-rad/answer_all_list.json
  medvqa train ... --resume latest        # continue OUT/checkpoint.pt after a stop

OUT gets run_config.json, history.json, checkpoint.pt (resumable) and bundle/
(the model chosen on validation, for `medvqa eval`, `predict` and `demo`)."""


def build_parser():
    import argparse

    d = TrainConfig()
    p = argparse.ArgumentParser(prog="medvqa train", description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=d.dataset, choices=["vqa-rad", "slake", "pmc-vqa", "hf"])
    g.add_argument("--data", default=d.data, help=f"dataset folder or hub id (default: {d.data})")
    g.add_argument("--train-split", default=d.train_split)
    g.add_argument("--val-split", default=d.val_split, help="split name, 'carved', or 'auto' (default)")
    g.add_argument("--val-fraction", type=float, default=d.val_fraction)
    g.add_argument("--val-by", default=d.val_by, choices=["image", "question"],
                   help="carve validation by image (default) or by question (as VQA-RAD splits train/test)")
    g.add_argument("--lang", default=d.lang, help="SLAKE question language (default: en)")
    g.add_argument("--answers", default=d.answers, help="'train' or a candidate list JSON (MEVF protocol)")
    g = p.add_argument_group("model")
    g.add_argument("--encoder", default=d.encoder, help="encoder name, folder or hub id (default: %(default)s)")
    g.add_argument("--encoder-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="override of a registered encoder's config, e.g. image_size=224 (repeatable)")
    g.add_argument("--encoder-mode", default=d.encoder_mode, choices=["frozen", "finetune"])
    g.add_argument("--image-features", default=d.image_features, choices=["grid", "pooled"],
                   help="regions the head attends over: the encoder's grid, or its pooled vector (PubMedCLIP)")
    g.add_argument("--head", default=d.head, help="mevf-ban | mevf-san | qcr | mc-ban (default: %(default)s)")
    g.add_argument("--head-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="a field of the head's config, e.g. hidden_dim=512 (repeatable)")
    g.add_argument("--embed-dim", type=int, default=d.embed_dim)
    g.add_argument("--question-dim", type=int, default=d.question_dim)
    g.add_argument("--glove", default=None, help="GloVe text file or .npy aligned with the vocabulary")
    g.add_argument("--max-len", type=int, default=d.max_len)
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--optimizer", default=d.optimizer, choices=["adamax", "adamw"])
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    g.add_argument("--clip-norm", type=float, default=d.clip_norm)
    g.add_argument("--loss", default=d.loss, choices=["bce", "ce"],
                   help="bce: MEVF's per-answer sigmoid loss; ce: softmax cross-entropy (default: %(default)s)")
    g.add_argument("--precision", default=d.precision, choices=["fp32", "bf16", "fp16"])
    g.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: one per core)")
    g.add_argument("--seed", type=int, default=d.seed)
    g = p.add_argument_group("outputs")
    g.add_argument("--out", default=d.out)
    g.add_argument("--cache-dir", default=None, help="feature cache root (default: $MEDVQA_CACHE/features)")
    g.add_argument("--resume", default=None, help="'latest' (OUT/checkpoint.pt) or a checkpoint path")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def config_from_args(args) -> TrainConfig:
    values = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    values["head_args"] = parse_key_values(args.head_arg, "--head-arg")
    values["encoder_args"] = parse_key_values(args.encoder_arg, "--encoder-arg")
    values["progress"] = not args.no_progress
    return TrainConfig(**values)


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_args(build_parser().parse_args(argv))
    bundle = train(cfg)
    print(json.dumps({"bundle": str(bundle), **json.loads((bundle / "metrics.json").read_text())["validation"]},
                     indent=2))
    return 0
