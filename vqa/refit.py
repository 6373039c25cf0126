"""`medvqa train --refit`: once validation has chosen the epoch, train the same model again on train and validation
together, for that many epochs of the same schedule, and keep the last.

A carved validation split costs the model a tenth of its training questions; on VQA-RAD that tenth holds
near-copies of test questions, and training on all of train is much of what the references' protocol (epoch
picked on test) gains. The refit trains on everything without looking at test: the number of epochs is the only
thing validation decides. What it cannot give is a question the final model has not trained on, so the bundle keeps
the validation run's calibration and abstention threshold (a proxy, as bagging's is) and says so.

    OUT/                 the validation run (checkpoint, history), as without --refit
    OUT/refit/           the refit: its own checkpoint (resumable) and history
    OUT/bundle/          the refit model
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from .batches import Tokenizer
from .data.record import Record
from .model import VQAModel
from .train import TrainConfig, VQATask, build_model, make_split, vocabularies
from .training import FitResult, Runtime, Trainer, seed_everything
from .training.distributed import main_process_first

log = logging.getLogger(__name__)


class RefitTask(VQATask):
    """The task on every training question, nothing held out: no validation, the last epoch is kept."""

    selection = None

    def evaluate(self) -> None:
        return None

    def identity(self) -> dict:
        return {**super().identity(), "refit_epochs": self.cfg.epochs, "schedule_epochs": self.cfg.schedule_epochs}


def refit_config(cfg: TrainConfig, epochs: int) -> TrainConfig:
    """The validation run's configuration, `epochs` long on its schedule, written under OUT/refit."""
    return dataclasses.replace(cfg, epochs=epochs, schedule_epochs=cfg.schedule_length,
                               freeze_epochs=min(cfg.freeze_epochs, epochs), out=str(Path(cfg.out) / "refit"),
                               resume="latest" if cfg.resume else None)


def refit(cfg: TrainConfig, rt: Runtime, train: list[Record], val: list[Record], loss: str, epochs: int
          ) -> tuple[VQAModel, Tokenizer, RefitTask, FitResult]:
    """The validation run started again from its seed (the same vocabularies, built from `train`, and the same
    initial weights: a text tower is built anew, not the trained one reused) and trained on `train` + `val` for
    `epochs` epochs of its schedule."""
    rcfg = refit_config(cfg, epochs)
    records = train + val
    log.info("refit: training again on all %d questions (train and validation) for %d of the schedule's %d epochs",
             len(records), epochs, rcfg.schedule_epochs)
    seed_everything(cfg.seed)
    tokenizer, answers = vocabularies(rcfg, train)
    model = build_model(rcfg, tokenizer, answers).to(rt.device)
    # the validation run cached every image, but not the augmented views (--feature-views) of validation's images
    with main_process_first(rt.world):
        split = make_split(rcfg, model, records, tokenizer, answers, rt.device, views=cfg.feature_views)
    task = RefitTask(rcfg, model, split, None, answers, loss, rt.device, rt.world)
    return model, tokenizer, task, Trainer(task, rcfg, rt).fit()
