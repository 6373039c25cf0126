"""Image classification with any encoder (`medvqa classify`): linear probe, fine-tuning, CLIP zero-shot.

    report = classify(ClassifyConfig(format="medmnist", data="path/to/medmnist", flag="pathmnist", size=224,
                                     method="probe", encoder="runs/pretrain/encoder", out="runs/cls"))
    report["test"]   # {"accuracy": ..., "auc": ..., "n": ...}, model selected on val

Methods:
- `probe`: scikit-learn logistic regression on the frozen encoder's features (the pooled vector, or the
  flattened grid), standardised on train, read through the feature cache; its inverse regularisation C
  is chosen on val (`select`: AUC or accuracy), and that model is scored on test.
- `finetune`: the encoder and a linear layer trained end to end on the engine (`vqa.training`: precision,
  DDP, checkpoints, resume), cross-entropy (binary cross-entropy per label for multi-label sets); the
  epoch with the best val `select` metric is kept and scored on test (`pretrain.classify_finetune`).
- `zero-shot`: a CLIP model's text tower embeds prompts for each class ("a {modality} image showing
  {label}."-style templates from `pretrain/classify_prompts.json` or `--prompts`); each image takes the
  class whose mean prompt embedding is nearest; scores are the softmax of the model's scaled cosine
  similarities. Multi-label sets: each label against its negated prompts ("no {label}"), a 2-way softmax.
  Nothing is fitted: val and test are both reported.

Metrics as MedMNIST reports them (its `evaluator.getACC`/`getAUC`): accuracy (argmax; at 0.5 on the
positive score for binary sets; the mean over labels of per-label accuracy at 0.5 for multi-label sets)
and AUC (one-vs-rest, averaged over classes; the positive class's AUC for binary sets; the mean per-label
AUC for multi-label sets). The majority baseline is the best constant prediction on the split scored.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vqa.data.classification import (BINARY, MULTI_LABEL, ClassificationSet, describe, load_classification)
from vqa.errors import DataError
from vqa.io import atomic_write_json, atomic_write_text, read_json
from vqa.training import EngineConfig

log = logging.getLogger(__name__)
METHODS = ("probe", "finetune", "zero-shot")
PROBE_CS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # inverse L2 strength, chosen on val
DEFAULT_PROMPTS = Path(__file__).parent / "classify_prompts.json"


@dataclass
class ClassifyConfig(EngineConfig):
    # data
    format: str = "medmnist"  # medmnist | imagefolder | hf
    data: str = "runs/phantom/classification/medmnist/phantommodalitymnist_64.npz"
    flag: str | None = None  # MedMNIST: which set in a folder of npz files (pathmnist, chestmnist, ...)
    size: int | None = None  # MedMNIST: 28, 64, 128 or 224 when a folder holds several
    labels: str | None = None  # MedMNIST: label names (an INFO entry as JSON) where no sidecar or medmnist has them
    image_column: str | None = None  # hf: default image / img
    label_column: str | None = None  # hf: default label / labels / class
    # method
    method: str = "probe"  # probe | finetune | zero-shot
    encoder: str = "clip-vit-tiny"  # probe / finetune: any encoder spelling of `encoders`
    encoder_args: dict = field(default_factory=dict)  # overrides for a registered name
    clip: str | None = None  # zero-shot: a CLIP model (OUT/clip, CLIPModel folder/hub id, hf-hub:, .pt file)
    prompts: str | None = None  # zero-shot prompt JSON (default: pretrain/classify_prompts.json)
    prompt_set: str | None = None  # the entry of the prompt file to use (default: the dataset's name, else "default")
    features: str = "pooled"  # probe: pooled | grid (flattened)
    select: str = "auc"  # the val metric that picks the probe's C and the fine-tuned epoch: auc | accuracy
    cache_dir: str | None = None  # feature cache root (default: $MEDVQA_CACHE/features)
    # fine-tuning
    encoder_lr: float | None = None  # the encoder's learning rate (default: lr / 10: pretrained weights move less)
    augment: bool = False  # small affine, resized crop, intensity (never a flip)
    image_cache: str = "auto"  # ram | stream | auto
    cache_limit_gb: float = 8.0
    workers: int = 0
    # the engine's fields, with this task's defaults
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    out: str = "runs/classify"

    def validate(self) -> None:
        if self.method not in METHODS:
            raise DataError(f"--method {self.method!r}: expected one of {', '.join(METHODS)}")
        if self.method == "zero-shot" and not self.clip:
            raise DataError("--method zero-shot needs --clip MODEL (a CLIP model with its text tower)")
        if self.features not in ("pooled", "grid"):
            raise DataError(f"--features {self.features!r}: expected pooled or grid")
        if self.select not in ("auc", "accuracy"):
            raise DataError(f"--select {self.select!r}: expected auc or accuracy")


# -- metrics -----------------------------------------------------------------------------------------------------
def _auc(y: np.ndarray, s: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s)) if len(np.unique(y)) == 2 else None  # undefined with one class present


def classification_metrics(labels: np.ndarray, scores: np.ndarray, task: str, threshold: float = 0.5) -> dict:
    """MedMNIST's ACC and AUC (in [0, 1]) of `scores` (N, K) against `labels` ((N,) ids or (N, L) 0/1).

    A class (or label) absent from the split has no AUC; the average is over the others (`auc_classes`)."""
    scores = np.asarray(scores, dtype=np.float64)
    if task == MULTI_LABEL:
        accuracy = float(np.mean([np.mean((scores[:, j] > threshold) == labels[:, j]) for j in range(labels.shape[1])]))
        aucs = [_auc(labels[:, j], scores[:, j]) for j in range(labels.shape[1])]
    elif task == BINARY:
        accuracy = float(np.mean((scores[:, -1] > threshold) == labels))
        aucs = [_auc(labels, scores[:, -1])]
    else:
        accuracy = float(np.mean(scores.argmax(1) == labels))
        aucs = [_auc((labels == k).astype(int), scores[:, k]) for k in range(scores.shape[1])]
    kept = [a for a in aucs if a is not None]
    return {"n": int(len(labels)), "accuracy": accuracy, "auc": float(np.mean(kept)) if kept else None,
            "auc_classes": len(kept)}


def majority_accuracy(labels: np.ndarray, task: str) -> float:
    """The accuracy of the best constant prediction on this split (per label for multi-label sets)."""
    if task == MULTI_LABEL:
        return float(np.mean([max(col.mean(), 1 - col.mean()) for col in labels.T.astype(float)]))
    return float(np.bincount(labels).max() / len(labels))


def selected(metrics: dict, select: str) -> float:
    """The selection metric, falling back to accuracy when AUC is undefined (a val split with one class)."""
    value = metrics.get(select)
    return float(metrics["accuracy"] if value is None else value)


# -- the linear probe --------------------------------------------------------------------------------------------
def frozen_features(encoder, data: ClassificationSet, kind: str, cache_dir, device, progress: bool) -> np.ndarray:
    """(N, D) pooled or (N, G*D) flattened grid features of a frozen encoder, through the feature cache."""
    from vqa.features import feature_table

    table = feature_table(encoder, data.images, cache_dir, device=device, progress=progress)
    x = table["pooled"] if kind == "pooled" else table["grid"].flatten(1)
    return x.float().numpy()


class LinearProbe:
    """Standardised features -> logistic regression (one per label for multi-label sets)."""

    def __init__(self, task: str, c: float, n_classes: int) -> None:
        self.task, self.c, self.n_classes = task, c, n_classes

    def fit(self, x: np.ndarray, y: np.ndarray) -> "LinearProbe":
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        self.scaler = StandardScaler().fit(x)
        x = self.scaler.transform(x)
        columns = y.T if self.task == MULTI_LABEL else [y]
        self.models = []
        for col in columns:
            if len(np.unique(col)) < 2:  # a label never (or always) present in train: predict its constant
                self.models.append(float(col[0]))
            else:
                self.models.append(LogisticRegression(C=self.c, max_iter=2000).fit(x, col))
        return self

    def scores(self, x: np.ndarray) -> np.ndarray:
        """(N, K) class probabilities, or (N, L) per-label probabilities."""
        x = self.scaler.transform(x)
        if self.task == MULTI_LABEL:
            return np.stack([np.full(len(x), m) if isinstance(m, float) else m.predict_proba(x)[:, 1]
                             for m in self.models], 1)
        model = self.models[0]
        out = np.zeros((len(x), self.n_classes))
        if isinstance(model, float):
            out[:, int(model)] = 1.0
        else:
            out[:, model.classes_] = model.predict_proba(x)  # classes absent from train keep probability 0
        return out


def run_probe(cfg: ClassifyConfig, splits: dict[str, ClassificationSet], device) -> dict:
    """Fit a probe per C on train, keep the best on val, score it on test."""
    from encoders import create_encoder

    encoder = create_encoder(cfg.encoder, **cfg.encoder_args).eval()
    feats = {s: frozen_features(encoder, d, cfg.features, cfg.cache_dir, device, cfg.progress)
             for s, d in splits.items()}
    train, val, test = splits["train"], splits["val"], splits["test"]
    n_classes = len(train.label_names)
    best, sweep = None, []
    for c in PROBE_CS:
        probe = LinearProbe(train.task, c, n_classes).fit(feats["train"], train.labels)
        m = classification_metrics(val.labels, probe.scores(feats["val"]), val.task)
        sweep.append({"C": c, **m})
        if best is None or selected(m, cfg.select) > selected(best[1], cfg.select):
            best = (probe, m)
    probe, val_metrics = best
    log.info("probe: C = %g chosen on val (%s %.4f)", probe.c, cfg.select, selected(val_metrics, cfg.select))
    return {"val": val_metrics, "test": classification_metrics(test.labels, probe.scores(feats["test"]), test.task),
            "selection": {"metric": f"val {cfg.select}", "C": probe.c, "sweep": sweep},
            "model": {"encoder": cfg.encoder, "fingerprint": encoder.fingerprint(), "features": cfg.features,
                      "feature_dim": int(feats["train"].shape[1])}}


# -- zero-shot ---------------------------------------------------------------------------------------------------
def load_prompt_file(path: str | Path | None = None) -> dict:
    data = read_json(DEFAULT_PROMPTS if path is None else path)
    if not isinstance(data, dict) or not isinstance(data.get("default"), dict):
        raise DataError(f"{path or DEFAULT_PROMPTS}: expected a JSON object with a 'default' entry "
                        "{\"templates\": [...], ...} and entries per dataset")
    return {k: v for k, v in data.items() if not k.startswith("_")}


def prompt_entry(prompts: dict, data: ClassificationSet, prompt_set: str | None = None) -> tuple[str, dict]:
    """(name, entry) of the prompts for `data`: `prompt_set`, else the entry named like the dataset (or listing
    it under "datasets"), else "default". An entry that does not name every class falls back to the default."""
    if prompt_set is not None:
        if prompt_set not in prompts:
            raise DataError(f"--prompt-set {prompt_set!r} is not in the prompt file (has {sorted(prompts)})")
        key = prompt_set
    else:
        key = next((k for k, v in prompts.items() if k == data.name or data.name in v.get("datasets", [])), "default")
    entry = {**prompts["default"], **prompts[key]}
    unnamed = [c for c in data.label_names if "names" in prompts[key] and c not in prompts[key]["names"]]
    if unnamed:
        if prompt_set is not None:
            raise DataError(f"prompt set {key!r} names no prompts for the classes {unnamed}")
        log.warning("prompts %r do not name the classes %s of %s: using the default prompts", key, unnamed, data.name)
        key, entry = "default", dict(prompts["default"])
    return key, entry


def class_texts(entry: dict, label: str, negative: bool = False) -> list[str]:
    """Every template filled with every name of `label` ({} or {label}; {modality} from the entry)."""
    templates = entry.get("negative_templates" if negative else "templates") or ["{label}"]
    names = entry.get("names", {}).get(label, [label])
    return [t.format(n, label=n, modality=entry.get("modality", "medical")) for t in templates for n in names]


def zero_shot_scores(clip, image_embeds: torch.Tensor, data: ClassificationSet, entry: dict) -> np.ndarray:
    """(N, K) softmax over classes of the scaled cosine similarity to each class's mean prompt embedding;
    multi-label: (N, L) per-label probability of the label's prompts against its negated prompts."""
    def mean_embedding(texts: list[str]) -> torch.Tensor:
        e = clip.text_embeddings(texts).mean(0)
        return e / e.norm()

    if data.multi_label:
        out = []
        for label in data.label_names:
            pair = torch.stack([mean_embedding(class_texts(entry, label, negative=True)),
                                mean_embedding(class_texts(entry, label))])  # (2, E)
            out.append((clip.logit_scale * image_embeds @ pair.t()).softmax(-1)[:, 1])
        return torch.stack(out, 1).numpy()
    classes = torch.stack([mean_embedding(class_texts(entry, c)) for c in data.label_names])  # (K, E)
    return (clip.logit_scale * image_embeds @ classes.t()).softmax(-1).numpy()


def run_zero_shot(cfg: ClassifyConfig, splits: dict[str, ClassificationSet], device) -> dict:
    from .zero_shot_clip import load_zero_shot_clip

    clip = load_zero_shot_clip(cfg.clip, device)
    key, entry = prompt_entry(load_prompt_file(cfg.prompts), splits["test"], cfg.prompt_set)
    out = {}
    for split in ("val", "test"):
        data = splits[split]
        embeds = clip.image_embeddings(data.images, cfg.cache_dir, cfg.progress)
        out[split] = classification_metrics(data.labels, zero_shot_scores(clip, embeds, data, entry), data.task)
    examples = {c: class_texts(entry, c)[:3] for c in splits["test"].label_names}
    return {**out, "selection": {"metric": "none (zero-shot: nothing is fitted)"},
            "model": {"clip": cfg.clip, "logit_scale": clip.logit_scale, "prompt_set": key,
                      "prompt_examples": examples}}


# -- the run -----------------------------------------------------------------------------------------------------
def load_splits(cfg: ClassifyConfig) -> dict[str, ClassificationSet]:
    options = {"flag": cfg.flag, "size": cfg.size, "labels": cfg.labels, "image_column": cfg.image_column,
               "label_column": cfg.label_column}
    splits = {s: load_classification(cfg.format, cfg.data, s, **options) for s in ("train", "val", "test")}
    names = {s: d.label_names for s, d in splits.items()}
    if len(set(names.values())) != 1:
        raise DataError(f"{cfg.data}: the splits have different classes: {names}")
    for split, data in splits.items():
        log.info("%s %s: %s", data.name, split, describe(data))
    return splits


def classify(cfg: ClassifyConfig) -> dict:
    """Run `cfg.method`; write OUT/metrics.json, OUT/report.md and OUT/run_config.json; return the report."""
    from vqa.training import resolve_device, seed_everything, write_run_config

    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)  # a registered encoder's random init (the untrained control) repeats
    splits = load_splits(cfg)
    if cfg.method == "finetune":
        from .classify_finetune import run_finetune

        result = run_finetune(cfg, splits)
        if "test" not in result:  # --stop-after ended the run (continue it with --resume latest), or not rank 0
            return result
    else:
        device = resolve_device(cfg.device)
        result = (run_probe if cfg.method == "probe" else run_zero_shot)(cfg, splits, device)
    test = splits["test"]
    report = {"method": cfg.method, "dataset": {"name": test.name, "format": cfg.format, "data": cfg.data,
                                                "task": test.task, "labels": list(test.label_names),
                                                "n": {s: len(d) for s, d in splits.items()}},
              **result, "majority": {s: majority_accuracy(splits[s].labels, splits[s].task) for s in ("val", "test")},
              "protocol": PROTOCOL}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_run_config(cfg, out)
    atomic_write_json(out / "metrics.json", report)
    atomic_write_text(out / "report.md", markdown(report))
    return report


PROTOCOL = ("MedMNIST's metrics: accuracy (argmax; 0.5 on the positive score for binary and per label for "
            "multi-label sets) and AUC (one-vs-rest mean; per-label mean for multi-label sets); the model (probe C, "
            "fine-tuned epoch) selected on val, scored on test; majority = the best constant prediction on the split")


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def markdown(report: dict) -> str:
    d = report["dataset"]
    lines = [f"# {d['name']} ({d['task']}, {len(d['labels'])} classes): {report['method']}", "",
             f"Protocol: {report['protocol']}.", "",
             "| split | n | accuracy | AUC | majority accuracy |", "|---|---|---|---|---|"]
    for split in ("val", "test"):
        m = report[split]
        lines.append(f"| {split} | {m['n']} | {_pct(m['accuracy'])} | {_pct(m['auc'])} | "
                     f"{_pct(report['majority'][split])} |")
    lines += ["", f"Selection: {report['selection']['metric']}" +
              (f", C = {report['selection']['C']:g}" if "C" in report["selection"] else "") +
              (f", epoch {report['selection']['epoch']}" if "epoch" in report["selection"] else "") + "."]
    return "\n".join(lines) + "\n"
