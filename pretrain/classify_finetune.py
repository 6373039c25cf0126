"""Fine-tuning an encoder with a linear classifier on the engine (`medvqa classify --method finetune`).

The image tower and one linear layer over its pooled vector train end to end (cross-entropy; binary
cross-entropy per label for multi-label sets), the encoder at `encoder_lr` (default lr / 10: pretrained
weights should move less than the fresh layer). The engine gives precision, DDP, checkpoints and resume;
the epoch with the best val AUC (or accuracy, `select`) is kept whole, BatchNorm statistics included,
and scored on test. OUT gets `encoder/` (loadable by `--encoder OUT/encoder` everywhere), the
classifier's weights `head.safetensors` and `labels.json`.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from encoders import normalize
from vqa.data.classification import MULTI_LABEL, ClassificationSet
from vqa.io import atomic_write_json, atomic_write_safetensors
from vqa.training import Selection, StepContext, StepOutput, Trainer, TrainingTask, World, epoch_plan, runtime
from vqa.training.augment import augment
from vqa.training.schedule import Shard

from .classify import ClassifyConfig, classification_metrics, selected

log = logging.getLogger(__name__)
AUGMENT_CROP, AUGMENT_INTENSITY = 0.15, 0.1  # as `medvqa train --augment`


class ClassifierModel(nn.Module):
    """An image encoder and a linear layer over its pooled vector."""

    def __init__(self, encoder: nn.Module, n_outputs: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(encoder.feature_dim, n_outputs)

    def forward(self, pixels: Tensor) -> dict[str, Tensor]:
        pooled = self.encoder.forward_features(pixels)["pooled"]  # (B, D)
        return {"logits": self.classifier(pooled)}  # (B, K)


class ClassificationTask(TrainingTask):
    path_settings = ("data", "encoder")
    resume_settings = ("encoder_lr",)

    def __init__(self, cfg: ClassifyConfig, model: ClassifierModel, train: tuple[Any, np.ndarray],
                 val: tuple[Any, np.ndarray], task: str, device: torch.device, world: World) -> None:
        self.cfg, self.model, self.task, self.device, self.world = cfg, model, task, device, world
        self.train_images, self.train_labels = train
        self.val_images, self.val_labels = val
        self.selection = Selection("score")  # the val `select` metric (accuracy where AUC is undefined)
        self.loss_fn = nn.BCEWithLogitsLoss() if task == MULTI_LABEL else nn.CrossEntropyLoss()
        self.epoch = 0

    def configure_optimizer(self, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        encoder_lr = self.cfg.encoder_lr if self.cfg.encoder_lr is not None else lr / 10
        groups = [{"params": [p for p in self.model.encoder.parameters() if p.requires_grad], "lr": encoder_lr},
                  {"params": list(self.model.classifier.parameters()), "lr": lr}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, weight_decay=weight_decay)

    def _plan(self, epoch: int) -> list[list[Shard]]:
        return epoch_plan(len(self.train_labels), self.cfg.batch_size, self.world, self.cfg.seed, epoch,
                          drop_last=False)

    def steps_per_epoch(self) -> int:
        return len(self._plan(0))

    def train_steps(self, epoch: int):
        self.epoch = epoch
        plan = self._plan(epoch)
        pixels = self.train_images.batches([shard.indices.tolist() for (shard,) in plan])
        for s, (shard,) in enumerate(plan):
            yield s, shard, next(pixels)

    def training_step(self, model, item: tuple[int, Shard, Tensor], step: StepContext) -> StepOutput:
        s, shard, pixels = item
        if self.cfg.augment:
            g = torch.Generator().manual_seed((self.cfg.seed * 100_003 + self.epoch) * 10_007 + s)
            pixels = augment(pixels, g, crop=AUGMENT_CROP, intensity=AUGMENT_INTENSITY, draws=shard.draws)
        x = normalize(pixels, self.model.encoder, self.device)
        target = torch.as_tensor(self.train_labels[shard.indices.numpy()], device=self.device)
        with step.autocast():
            logits = model(x)["logits"]
        loss = self.loss_fn(logits.float(), target.float() if self.task == MULTI_LABEL else target)
        step.backward(loss * shard.share)
        return StepOutput({"loss": loss.detach()}, len(shard))

    @torch.no_grad()
    def scores(self, images, batch_size: int = 128) -> np.ndarray:
        """(N, K) probabilities: softmax over classes, or a sigmoid per label."""
        was_training = self.model.training
        self.model.eval()
        batches = [list(range(s, min(s + batch_size, len(images)))) for s in range(0, len(images), batch_size)]
        out = []
        try:
            for pixels in images.batches(batches):
                with StepContext(self.cfg.precision, self.device, None).autocast():
                    logits = self.model(normalize(pixels, self.model.encoder, self.device))["logits"].float()
                out.append((logits.sigmoid() if self.task == MULTI_LABEL else logits.softmax(-1)).cpu())
        finally:
            self.model.train(was_training)
        return torch.cat(out).numpy()

    def evaluate(self) -> dict:
        metrics = classification_metrics(self.val_labels, self.scores(self.val_images), self.task)
        return {**metrics, "score": selected(metrics, self.cfg.select)}

    def describe(self, metrics: dict) -> str:
        auc = "–" if metrics["auc"] is None else f"{metrics['auc']:.4f}"
        return f"accuracy {metrics['accuracy']:.4f}, AUC {auc}"

    def identity(self) -> dict:
        keys = ("format", "data", "flag", "size", "encoder", "encoder_args", "encoder_lr", "augment", "select",
                "batch_size")
        return {**{k: getattr(self.cfg, k) for k in keys}, "world_size": self.world.size}


def run_finetune(cfg: ClassifyConfig, splits: dict[str, ClassificationSet]) -> dict:
    """Train on train, keep the best val epoch, score test; on the main process write OUT/encoder and the head."""

    from encoders import create_encoder, image_source

    train, val, test = splits["train"], splits["val"], splits["test"]
    n_out = len(train.label_names)
    with runtime(cfg) as rt:
        encoder = create_encoder(cfg.encoder, **cfg.encoder_args)
        model = ClassifierModel(encoder, n_out).to(rt.device)

        def source(data: ClassificationSet):
            return image_source(data.images, encoder, cfg.image_cache, cfg.cache_limit_gb, cfg.workers, cfg.progress)

        task = ClassificationTask(cfg, model, (source(train), train.labels), (source(val), val.labels), train.task,
                                  rt.device, rt.world)
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        result = Trainer(task, cfg, rt).fit()
        if not result.completed:
            return {"stopped_after_epoch": result.history[-1]["epoch"] if result.history else 0}
        if not rt.world.is_main:
            return {}
        best = dict(result.best or {})
        val_metrics = {k: best[k] for k in ("n", "accuracy", "auc", "auc_classes") if k in best}
        test_metrics = classification_metrics(test.labels, task.scores(source(test)), test.task)
        out = Path(cfg.out)
        model.encoder.save_pretrained(out / "encoder")
        atomic_write_safetensors(out / "head.safetensors", {k: v.detach().cpu().contiguous()
                                                            for k, v in model.classifier.state_dict().items()})
        atomic_write_json(out / "labels.json", {"labels": list(train.label_names), "task": train.task,
                                                "input": "the encoder's pooled vector"})
    return {"val": val_metrics, "test": test_metrics,
            "selection": {"metric": f"val {cfg.select}", "epoch": best.get("epoch")},
            "history": result.history,
            "model": {"encoder": cfg.encoder, "saved": str(out / "encoder")}}
