"""Head training (`medvqa train`): fit a VQA head on a (usually frozen) image encoder, select the epoch
on validation, write a bundle. A task on the engine (`vqa.training`).

With a frozen encoder every image is encoded once through the feature cache and the head
trains on cached features. `encoder_mode="finetune"` trains through the encoder (MEVF's
recipe, with the encoder's own auxiliary loss when it declares one).

    bundle = train(TrainConfig(data="runs/phantom/vqa-rad", head="qcr", out="runs/qcr"))
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import torch

from .answers import AnswerVocab
from .batches import QuestionTensors, Tokenizer, encode_questions, unique_images
from .bundle import check_weights_dtype, round_weights, save as save_bundle
from .data import carve_validation, dataset_format, is_test_split, load_records
from .data.record import CLOSED, OPEN, Record
from .errors import DataError
from .calibration import Calibration
from .features import feature_table, pixel_table
from .inference import ANSWER_PRECISION, model_inputs, predict
from .metrics import choice_metrics, vqa_metrics
from .model import VQAModel
from .model_card import training_data, write_card
from .ood import MODEL_SPACE, detector_encoder, fit_detector
from .trust import TrustScorer, asked_about, image_ids
from .stats import duplicate_records
from .target_risk import DEFAULT_TARGET_RISK, TargetRisk
from .text import WordVocab
from .training import (EngineConfig, Runtime, Selection, StepContext, StepOutput, Trainer, TrainingTask, World,
                       epoch_plan, runtime, shareable_config, write_run_config)
from .training.augment import augment
from .training.schedule import Shard, check_schedule

log = logging.getLogger(__name__)
# What must match to resume: the data, the model and the batch order (the engine adds the seed).
AUGMENT_CROP, AUGMENT_INTENSITY = 0.15, 0.1  # --augment: crops keep >= 85 % of each side; +-10 % contrast, brightness
IDENTITY = ("format", "data", "train_split", "lang", "encoder", "encoder_args", "encoder_mode", "image_features",
            "head", "head_args", "question_encoder", "question_mode", "loss", "answers", "val_split", "val_fraction",
            "val_by", "val_seed", "batch_size", "freeze_epochs", "augment", "feature_views", "encoder_norm")
WORD_ENCODER = "gru"


@dataclass
class TrainConfig(EngineConfig):
    # data
    format: str = "vqa-rad"  # on-disk format: vqa-rad | slake | pmc-vqa | hf
    data: str = "runs/phantom/vqa-rad"
    train_split: str = "train"
    val_split: str = "auto"  # a split name, or "auto": SLAKE's validate, else carved from train
    val_fraction: float = 0.1  # share of train images (or questions) carved out for validation
    val_by: str = "image"  # carve by image, or by question (VQA-RAD's own split is by question)
    val_seed: int | None = None  # the carve's seed (default: seed); an ensemble's members share one carve
    lang: str = "en"
    strict: bool = False  # refuse questions with an empty question or answer (default: skip them with a warning)
    answers: str = "train"  # "train" (train-only vocabulary) or a candidate list JSON (MEVF's)
    # model
    encoder: str = "clip-vit-tiny"  # registered name, save_pretrained folder, or hub id
    encoder_args: dict = field(default_factory=dict)  # overrides for a registered encoder, e.g. image_size
    encoder_mode: str = "frozen"  # frozen (cached features) | finetune (through the encoder)
    encoder_lr: float | None = None  # learning rate of the image encoder when fine-tuning (default: lr)
    freeze_epochs: int = 0  # fine-tuning: train the head alone on cached features first, for this many epochs
    encoder_norm: str = "train"  # fine-tuning: "train" updates the encoder's BatchNorm statistics, "frozen" keeps
    #                               the pretrained ones (the layers' scale and shift still learn)
    augment: bool = False  # fine-tuning: random affine, resized crop and intensity jitter (never a flip)
    feature_views: int = 0  # frozen: cache this many augmented copies of each training image (as --augment makes
    #                         them); each epoch a question reads its image or one of them, drawn at random
    image_features: str = "grid"  # grid (regions, attention maps) | pooled (one vector, as PubMedCLIP)
    head: str = "mevf-ban"
    head_args: dict = field(default_factory=dict)  # fields of the head's config dataclass
    question_encoder: str = WORD_ENCODER  # gru (word embeddings + GRU, MEVF) | a text tower: minilm, a Hugging
    #                                       Face folder or hub id (PubMedBERT, BioBERT, ...), bert-tiny (built here)
    question_mode: str = "finetune"  # a text tower: finetune (with question_lr) | frozen
    question_lr: float | None = None  # learning rate of a text tower's weights (default: lr)
    embed_dim: int = 300  # word embeddings (GloVe-300 as MEVF)
    question_dim: int = 1024  # question GRU hidden size
    glove: str | None = None  # GloVe text file, or a .npy aligned with the vocabulary
    max_len: int | None = None  # question tokens; None: 12 words (MEVF) for the GRU, 32 tokens for a text tower
    loss: str | None = None  # bce (MEVF: sigmoid per answer) | bce-mean (QCR) | ce (softmax); None: the head's own
    aux_weight: float = 1e-3  # weight of the encoder's auxiliary loss when fine-tuning (MEVF's autoencoder)
    optimizer: str = "adamax"  # adamax (MEVF, QCR) | adamw
    refit: bool = False  # after validation chose the epoch, train again on train + validation for that many epochs
    #                      of the same schedule and keep that model (vqa/refit.py)
    # abstention: answer only where validation answers were wrong at most this often (0.1, closed=0.05,open=0.2)
    target_risk: TargetRisk | float | str = DEFAULT_TARGET_RISK
    ood_encoder: str = MODEL_SPACE  # the out-of-scope detector's space: "same" (the model's image encoder) or a
    #                                 frozen encoder of its own, e.g. efficientnet-lite0-imagenet (vqa/ood.py)
    weights_dtype: str = "float32"  # the bundle's head weights (text tower included): float16 halves the file; the
    #                                 kept model is rounded first, so validation, calibration and metrics measure it
    cache_dir: str | None = None  # feature cache root (default: $MEDVQA_CACHE/features)
    # the engine's fields, with this task's defaults
    epochs: int = 20
    batch_size: int = 64
    lr: float = 2e-3
    clip_norm: float | None = 0.25  # MEVF clips the gradient norm at 0.25
    out: str = "runs/vqa"
    # settings that may name a file or folder of this machine: the bundle's run_config.json names them "local:NAME"
    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("data", "answers", "encoder", "question_encoder", "glove", "ood_encoder",
                                              "cache_dir")

    @property
    def word_encoder(self) -> bool:
        return self.question_encoder == WORD_ENCODER

    @property
    def carve_seed(self) -> int:
        """The seed of a carved validation split: --val-seed, else --seed."""
        return self.seed if self.val_seed is None else self.val_seed

    @property
    def question_len(self) -> int:
        return self.max_len or (12 if self.word_encoder else 32)

    @property
    def choice_len(self) -> int:
        return 8 if self.word_encoder else 16


@dataclass
class Split:
    records: list[Record]
    questions: QuestionTensors
    images: Any  # a feature table (frozen encoder) or an encoders.ImageTable of pixels (fine-tuning)
    features: Any = None  # fine-tuning after a frozen warm start: the initial encoder's feature table
    views: Any = None  # --feature-views: `images`' rows, then each augmented view's (view-major), as one table

    def inputs(self, frozen_phase: bool):
        """What the model reads now: the cached features during a frozen warm start, else `images`."""
        return self.features if frozen_phase and self.features is not None else self.images

    def view_rows(self, rows: torch.Tensor, generator: torch.Generator, draws: tuple[int, int]) -> torch.Tensor:
        """Rows of `views` for questions on image `rows`: each its image or one of its views (drawn `Shard.draws`)."""
        count = len(self.views["pooled"]) // len(self.images["pooled"])
        pick = torch.randint(0, count, (draws[1],), generator=generator)[draws[0]:draws[0] + len(rows)]
        return rows + pick * len(self.images["pooled"])


def validation_spec(cfg: TrainConfig) -> dict[str, Any]:
    """How validation was made, as the bundle records it (`medvqa ensemble` rebuilds the members' split from it)."""
    return {"split": cfg.val_split, "fraction": cfg.val_fraction, "by": cfg.val_by, "seed": cfg.carve_seed}


def load_splits(cfg: TrainConfig) -> tuple[list[Record], list[Record], str]:
    """(train records, validation records, how validation was made)."""
    train = load_records(cfg.format, cfg.data, cfg.train_split, lang=cfg.lang, strict=cfg.strict)
    if not train:
        raise DataError(f"{cfg.data}: split {cfg.train_split!r} has no questions")
    duplicates = duplicate_records(train)
    if duplicates:
        log.warning("%s: %d training question(s) repeat an earlier one (same image, question and answer), e.g. "
                    "%s: `medvqa data stats` lists them", cfg.data, len(duplicates), duplicates[0].question)
    val_split = (dataset_format(cfg.format).validation_split or "carved") if cfg.val_split == "auto" else cfg.val_split
    if val_split == "carved":
        train, val = carve_validation(train, cfg.val_fraction, cfg.carve_seed, by=cfg.val_by)
        how = f"carved from {cfg.train_split} ({cfg.val_fraction:.0%} of {cfg.val_by}s, seed {cfg.carve_seed})"
    else:
        val = load_records(cfg.format, cfg.data, val_split, lang=cfg.lang, strict=cfg.strict)
        how = f"split {val_split!r}"
        if is_test_split(val_split):
            log.warning("model selection on the test split (as MEVF/QCR's code does): test scores will be optimistic")
        if not val:
            raise DataError(f"{cfg.data}: validation split {val_split!r} has no questions")
    log.info("data: %d train / %d validation questions (validation %s)", len(train), len(val), how)
    return train, val, how


def vocabularies(cfg: TrainConfig, train: list[Record]) -> tuple[Tokenizer, AnswerVocab]:
    """The question tokenizer (a word vocabulary of train's questions, or the text tower) and the answers."""
    texts = [r.question for r in train] + [c for r in train for c in r.choices]
    if cfg.word_encoder:
        tokenizer: Tokenizer = WordVocab.build(texts)
        what = f"{len(tokenizer)} question words"
    else:
        tokenizer = text_question_encoder(cfg, texts)
        what = f"text tower {cfg.question_encoder} ({cfg.question_mode})"
    if cfg.answers == "train":
        answers = AnswerVocab.from_records(train)
    else:
        answers = AnswerVocab.from_candidates(cfg.answers, train)
    log.info("vocabularies: %s, %d answers (%s)", what, len(answers), answers.protocol)
    return tokenizer, answers


def text_question_encoder(cfg: TrainConfig, texts: list[str]):
    """A text tower (pretrained, or built with a word tokenizer of `texts`) as the heads' question encoder."""
    from encoders.text import TextQuestionEncoder, create_text_tower

    if cfg.question_mode not in ("finetune", "frozen"):
        raise DataError(f"--question-mode {cfg.question_mode!r}: expected 'finetune' or 'frozen'")
    if cfg.glove:
        raise DataError("--glove initialises word embeddings: it goes with --question-encoder gru only")
    return TextQuestionEncoder(create_text_tower(cfg.question_encoder, captions=texts),
                               freeze=cfg.question_mode == "frozen")


def build_model(cfg: TrainConfig, tokenizer: Tokenizer, answers: AnswerVocab) -> VQAModel:
    from encoders import create_encoder
    from heads import QuestionEncoderConfig, create_head, get_head_class, load_glove

    if cfg.encoder_mode not in ("frozen", "finetune"):
        raise DataError(f"--encoder-mode {cfg.encoder_mode!r}: expected 'frozen' or 'finetune'")
    encoder = create_encoder(cfg.encoder, **cfg.encoder_args)
    head_args = dict(cfg.head_args)
    if get_head_class(cfg.head).needs_answer_groups:
        head_args.setdefault("closed_mask", answers.type_mask(CLOSED))
        head_args.setdefault("open_mask", answers.type_mask(OPEN))
    question = (QuestionEncoderConfig(vocab_size=len(tokenizer), embed_dim=cfg.embed_dim, hidden_dim=cfg.question_dim)
                if isinstance(tokenizer, WordVocab) else tokenizer)  # a text tower: the encoder and its own tokenizer
    head = create_head(cfg.head, feature_dim=encoder.feature_dim, vocab_sizes={"answers": len(answers)},
                       question_encoder=question, **head_args)
    if cfg.glove:
        head.question_encoder.init_embeddings(load_glove(cfg.glove, tokenizer.words, cfg.embed_dim))
    if cfg.encoder_mode == "frozen":
        encoder.freeze()
    return VQAModel(encoder, head, cfg.image_features)


def make_split(cfg: TrainConfig, model: VQAModel, records: list[Record], tokenizer: Tokenizer,
               answers: AnswerVocab, device: torch.device, views: int = 0) -> Split:
    """One split's questions and image inputs; `views` augmented copies of each image (frozen: training only)."""
    images, rows = unique_images([r.image for r in records])
    questions = encode_questions(records, rows, tokenizer, answers, cfg.question_len, cfg.choice_len)
    if cfg.encoder_mode == "frozen":
        table = feature_table(model.encoder, images, cfg.cache_dir, device=device, progress=cfg.progress)
        if not views:
            return Split(records, questions, table)
        augmented = feature_table(model.encoder, augmented_views(model.encoder, images, views, cfg.seed, cfg.progress),
                                  cfg.cache_dir, device=device, progress=cfg.progress)
        return Split(records, questions, table, views={k: torch.cat([table[k], augmented[k]]) for k in table})
    warm = (feature_table(model.encoder, images, cfg.cache_dir, device=device, progress=cfg.progress)
            if cfg.freeze_epochs else None)
    return Split(records, questions, pixel_table(model.encoder, images, progress=cfg.progress), warm)


def augmented_views(encoder, images: list, views: int, seed: int, progress: bool = True, chunk: int = 256) -> list:
    """`views` augmented copies of every image at the encoder's size, view-major, as PIL images (the feature cache
    keys them by their pixels, so a rerun with the same seed encodes none of them again). The augmentation is
    --augment's: small affine, resized crop, intensity; never a flip."""
    from PIL import Image

    table = pixel_table(encoder, images, progress=progress)
    out = []
    for v in range(views):
        g = torch.Generator().manual_seed(seed * 1_000_003 + v)
        for start in range(0, len(table), chunk):  # bounded memory on large sets
            moved = augment(table.pixels[start:start + chunk], generator=g, crop=AUGMENT_CROP,
                            intensity=AUGMENT_INTENSITY)
            out += [Image.fromarray(p[0].numpy()) if p.shape[0] == 1 else Image.fromarray(p.permute(1, 2, 0).numpy())
                    for p in moved]
    log.info("feature views: %d augmented copies of %d training images", views, len(images))
    return out


def evaluate_split(model: VQAModel, split: Split, answers: AnswerVocab, device: torch.device,
                   precision: str) -> dict:
    """Accuracy metrics of `model` on a split (multiple-choice accuracy for choice questions)."""
    return split_metrics(split, predict_split(model, split, answers, device, precision))


def predict_split(model: VQAModel, split: Split, answers: AnswerVocab, device: torch.device, precision: str):
    """`model`'s answers to a split's questions (among their choices, for choice questions)."""
    mc = split.questions.choice_tokens is not None
    return predict(model, split.questions, split.images, answers, device, precision,
                   choices=[r.choices for r in split.records] if mc else None)


def split_metrics(split: Split, preds) -> dict:
    """Accuracy metrics of `preds`, the answers to a split's questions."""
    return (choice_metrics(split.records, preds.answers) if split.questions.choice_tokens is not None
            else vqa_metrics(split.records, preds.answers, preds.types))


class VQATask(TrainingTask):
    """A head (and, fine-tuning, its encoder) trained on one dataset's questions; the epoch with the best
    validation overall accuracy is kept."""

    selection = Selection("overall")
    path_settings = ("data", "encoder", "answers", "question_encoder")
    resume_settings = ("optimizer", "encoder_lr", "question_lr", "max_len", "aux_weight")

    def __init__(self, cfg: TrainConfig, model: VQAModel, train: Split, val: Split, answers: AnswerVocab,
                 loss: str, device: torch.device, world: World) -> None:
        from heads import loss_for_head

        self.cfg, self.model, self.train, self.val, self.answers = cfg, model, train, val, answers
        self.loss_kind, self.device, self.world = loss, device, world
        self.idle_parameters = cfg.encoder_mode == "finetune" and cfg.freeze_epochs > 0  # the warm start's encoder
        self.loss_fn = loss_for_head(model.head, kind=loss).to(device)
        self.epoch = 0
        if cfg.encoder_mode == "finetune":  # after the splits: the feature cache is filled by the encoder as loaded
            model.encoder.channels_last_()  # `model_inputs` gives it channels-last pixels
            if cfg.encoder_norm == "frozen":
                model.encoder.freeze_norm_()
                if not model.encoder.batch_norms:
                    log.warning("--encoder-norm frozen: encoder %s has no BatchNorm layer, so it changes nothing",
                                model.encoder.name)

    def configure_optimizer(self, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        """Three parameter groups: the image encoder (`encoder_lr`), a text tower (`question_lr`), the rest (`lr`):
        pretrained weights usually want a lower rate than the fresh fusion and classifiers."""
        text = getattr(self.model.head.question_encoder, "tower", None)
        pretrained = {"encoder": (self.model.encoder, self.cfg.encoder_lr), "text": (text, self.cfg.question_lr)}
        taken = {id(p) for module, _ in pretrained.values() if module is not None for p in module.parameters()}
        groups = [{"params": [p for p in module.parameters() if p.requires_grad], "lr": lr if rate is None else rate}
                  for module, rate in pretrained.values() if module is not None]
        groups.append({"params": [p for p in self.model.parameters() if p.requires_grad and id(p) not in taken],
                       "lr": lr})
        groups = [g for g in groups if g["params"]]
        if self.cfg.optimizer == "adamax":
            return torch.optim.Adamax(groups, lr=lr, weight_decay=weight_decay)
        if self.cfg.optimizer == "adamw":
            return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=self.device.type == "cuda")
        raise DataError(f"--optimizer {self.cfg.optimizer!r}: expected 'adamax' or 'adamw'")

    def _plan(self, epoch: int) -> list[list[Shard]]:
        return epoch_plan(len(self.train.questions), self.cfg.batch_size, self.world, self.cfg.seed, epoch,
                          drop_last=False)

    def steps_per_epoch(self) -> int:
        return len(self._plan(0))

    def train_steps(self, epoch: int):
        self.epoch = epoch  # the warm start and the augmentation follow the epoch (evaluate reads it too)
        for s, (shard,) in enumerate(self._plan(epoch)):
            yield s, shard

    @property
    def frozen_phase(self) -> bool:
        return self.epoch < self.cfg.freeze_epochs

    def training_step(self, model, item: tuple[int, Shard], step: StepContext) -> StepOutput:
        s, shard = item
        batch = self.train.questions.select(shard.indices)
        transform = None
        if self.cfg.augment:
            g = torch.Generator().manual_seed((self.cfg.seed * 100_003 + self.epoch) * 10_007 + s)
            transform = partial(augment, generator=g, crop=AUGMENT_CROP, intensity=AUGMENT_INTENSITY,
                                draws=shard.draws)
        images = self.train.inputs(self.frozen_phase)
        if self.train.views is not None:
            g = torch.Generator().manual_seed((self.cfg.seed * 100_003 + self.epoch) * 10_007 + s)
            batch["rows"], images = self.train.view_rows(batch["rows"], g, shard.draws), self.train.views
        image_in, kwargs = model_inputs(self.model, batch, images, self.device, transform)
        with step.autocast():
            out = model(image_in, batch["tokens"].to(self.device, non_blocking=True),
                        batch["lengths"].to(self.device, non_blocking=True), **kwargs)
        whole = ({"batch_types": self.train.questions.types[shard.whole].to(self.device)}
                 if self.loss_fn.reads_batch_types else {})  # QCR's branch means: over the global batch
        losses = dict(self.loss_fn(out, batch["answers"].to(self.device, non_blocking=True),
                                   batch["types"].to(self.device, non_blocking=True), **whole))
        total = losses["loss"]
        aux = self.model.encoder.auxiliary_loss(out["image_features"], image_in) if "image_features" in out else None
        if aux is not None:
            losses["aux_loss"] = aux
            total = total + self.cfg.aux_weight * aux
        losses["loss"] = total
        step.backward(total * shard.share)
        return StepOutput(losses, len(shard))

    def evaluate(self) -> dict:
        val = Split(self.val.records, self.val.questions, self.val.inputs(self.frozen_phase))
        return evaluate_split(self.model, val, self.answers, self.device, self.cfg.precision)

    def describe(self, metrics: dict) -> str:
        return f"overall {metrics['overall']:.4f}"

    def identity(self) -> dict:
        fields = {k: getattr(self.cfg, k) for k in IDENTITY}
        return {**fields, "loss": self.loss_kind, "world_size": self.world.size}


def train(cfg: TrainConfig) -> Path:
    """Train, keep the best epoch on validation, and write OUT/bundle; returns the bundle path."""
    from heads import get_head_class, list_heads

    if not get_head_class(cfg.head).trainable:
        raise DataError(f"--head {cfg.head}: not a head to train (heads to train: {', '.join(list_heads())}); "
                        "`medvqa ensemble` builds an ensemble from trained bundles")
    loss = cfg.loss or get_head_class(cfg.head).default_loss
    cfg = dataclasses.replace(cfg, target_risk=TargetRisk.parse(cfg.target_risk))
    check_weights_dtype(cfg.weights_dtype)
    check_schedule(cfg.lr_schedule, cfg.warmup_epochs)
    if cfg.refit and is_test_split(cfg.val_split):
        raise DataError("--refit trains again on train + the validation split, which here is test: choose the epoch "
                        "on a carved or named validation split")
    if (cfg.freeze_epochs or cfg.augment or cfg.encoder_lr is not None) and cfg.encoder_mode != "finetune":
        raise DataError("--freeze-epochs, --augment and --encoder-lr apply when fine-tuning (--encoder-mode finetune): "
                        "a frozen encoder's features are computed once (--feature-views augments its inputs)")
    if cfg.word_encoder and (cfg.question_lr is not None or cfg.question_mode != "finetune"):
        raise DataError("--question-lr and --question-mode are a text tower's: the GRU trains with the head at --lr")
    if cfg.encoder_norm not in ("train", "frozen") or (cfg.encoder_norm == "frozen" and cfg.encoder_mode != "finetune"):
        raise DataError(f"--encoder-norm {cfg.encoder_norm!r}: 'train', or 'frozen' when fine-tuning (--encoder-mode)")
    if cfg.feature_views < 0 or (cfg.feature_views and cfg.encoder_mode != "frozen"):
        raise DataError(f"--feature-views {cfg.feature_views}: a count >= 0 of augmented copies, for a frozen encoder")
    if cfg.epochs < 1:  # no epoch to choose (`medvqa pretrain --epochs 0`, by contrast, saves untrained towers)
        raise DataError(f"--epochs must be at least 1, got {cfg.epochs}")
    with runtime(cfg) as rt:
        train_records, val_records, val_how = load_splits(cfg)
        tokenizer, answers = vocabularies(cfg, train_records)
        model = build_model(cfg, tokenizer, answers).to(rt.device)
        ood_encoder = detector_encoder(cfg.ood_encoder, model.encoder)  # an unknown name fails before training
        task = _task(cfg, model, train_records, val_records, tokenizer, answers, loss, rt)
        if rt.world.is_main:
            Path(cfg.out).mkdir(parents=True, exist_ok=True)
            write_run_config(cfg, cfg.out)  # after the data and model proved valid: a failed start leaves nothing
        result = Trainer(task, cfg, rt).fit()
        if not result.completed:
            return Path(cfg.out) / "bundle"
        validation, calibration = result.best, None
        if rt.world.is_main:
            # the saved copy, answering in fp32 as `medvqa eval` and the Predictor run it, is what validation,
            # calibration and the card describe, whatever the weights' dtype and the precision it trained in
            if cfg.weights_dtype != "float32":
                round_weights(model.head, cfg.weights_dtype)
            answered = predict_split(task.model, task.val, task.answers, task.device, ANSWER_PRECISION)
            if cfg.weights_dtype != "float32" or cfg.precision != ANSWER_PRECISION:
                validation = {**(result.best or {}), **split_metrics(task.val, answered)}
            calibration = fit_calibration(task, answered, f"validation {val_how}" + (
                " (the validation run's model: the refit trained on these questions)" if cfg.refit else ""))
        metrics = {"validation": validation, "best_epoch": (result.best or {}).get("epoch"),
                   "history": result.history,
                   "protocol": {"answers": answers.protocol, "validation": val_how, "model_selection": selection(cfg)}}
        if cfg.refit:
            from .refit import refit
            from .training.distributed import all_gather_objects

            chosen = all_gather_objects(metrics["best_epoch"], rt.world)[0]  # only the main process validates
            model, tokenizer, task, refitted = refit(cfg, rt, train_records, val_records, loss, chosen)
            if not refitted.completed:
                return Path(cfg.out) / "bundle"
            if cfg.weights_dtype != "float32":
                round_weights(model.head, cfg.weights_dtype)
            metrics["refit"] = {"epochs": chosen, "questions": len(task.train.records), "history": refitted.history}
        if not rt.world.is_main:
            return Path(cfg.out) / "bundle"
        if cfg.refit and calibration.uses_trust:  # the refit model's fused space is its own: its memory, same weights
            calibration = calibration.with_trust(fit_trust(task))
        ood = fit_detector(model.encoder, unique_images([r.image for r in task.train.records])[0],
                           task.train.images, ood_encoder, rt.device, cfg.cache_dir, cfg.progress)
        log.info("calibration on validation: temperatures %s%s", {b: round(t, 3) for b, t in
                                                                   calibration.temperatures.items()},
                 f"; trust weights {calibration.trust_weights}" if calibration.uses_trust else "")
        training = {"loss": loss, "data": training_data(cfg.format, cfg.data, cfg.train_split, cfg.lang),
                    "validation": validation_spec(cfg), "numerics": rt.numerics}  # the kernels it trained on
        # the recipe travels with the model: `medvqa train --config BUNDLE/run_config.json --data ... --out ...`
        bundle = save_bundle(model, Path(cfg.out) / "bundle", answers=answers, tokenizer=tokenizer, metrics=metrics,
                             max_len=cfg.question_len, choice_len=cfg.choice_len, extra={"training": training},
                             calibration=calibration, ood=ood, weights_dtype=cfg.weights_dtype,
                             run_config=shareable_config(cfg))
        write_card(bundle)
        return bundle


def _task(cfg: TrainConfig, model: VQAModel, train_records, val_records, tokenizer, answers, loss: str,
          rt: Runtime) -> VQATask:
    from .training.distributed import main_process_first

    with main_process_first(rt.world):  # rank 0 fills the feature cache; the others then read it
        train_split = make_split(cfg, model, train_records, tokenizer, answers, rt.device, views=cfg.feature_views)
        val_split = make_split(cfg, model, val_records, tokenizer, answers, rt.device)
    return VQATask(cfg, model, train_split, val_split, answers, loss, rt.device, rt.world)


def fit_calibration(task: VQATask, preds, fitted_on: str) -> Calibration:
    """Temperatures, trust weights and abstention evidence from the kept model's validation answers `preds`."""
    val = task.val
    correct = [p == r.answer for p, r in zip(preds.answers, val.records)]
    trust = fit_trust(task)
    return Calibration.fit(preds.logits, preds.branches(), correct, fitted_on, task.cfg.target_risk,
                           trust=trust, fused=preds.fused, **asked_about(trust, val.records, task.cfg.progress))


def fit_trust(task: VQATask) -> TrustScorer | None:
    """The trust memory: the model's fused vectors of its training questions, with their answers, and what was asked
    about each training image (None for heads without fused vectors, multiple choice among them)."""
    train = task.train
    if not task.model.head.has_fused_output:
        return None
    preds = predict(task.model, train.questions, train.images, task.answers, task.device, ANSWER_PRECISION)
    return TrustScorer.fit(preds.fused, train.questions.answers, questions=[r.question for r in train.records],
                           image_ids=image_ids([r.image for r in train.records], task.cfg.progress))


def selection(cfg: TrainConfig) -> str:
    """How the bundle's epoch was chosen, in words (stated in its metrics.json protocol)."""
    if is_test_split(cfg.val_split):
        return "best overall accuracy on the test split itself (the reference code's protocol; optimistic)"
    if cfg.refit:
        return ("the epoch of best validation overall accuracy (never test), then trained again on train and "
                "validation together for that many epochs, the last kept (--refit)")
    return "best validation overall accuracy (never test)"
