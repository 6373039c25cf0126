"""The training engine: one loop for every task (head training, CLIP pretraining).

    with runtime(cfg) as rt:                     # threads, device, precision check, torchrun, seeds
        task = MyTask(..., device=rt.device, world=rt.world)
        result = Trainer(task, cfg, rt).fit()    # resume, epochs, checkpoints, best epoch restored

Each optimizer step: the task's `training_step` (forward + backward), then here: a check
that every loss is finite, fp16 unscaling, gradient clipping, a check that the gradient is
finite, the optimizer and LR-schedule steps. A non-finite loss or gradient stops the run
with an error naming the epoch and step (with fp16, steps the GradScaler skips are normal
and counted; only a run of them is an error). After each epoch the main process evaluates,
keeps the best epoch's trainable state (every parameter that trains, and the statistics of
modules that train: head and, when fine-tuning, encoder), writes the history and a
checkpoint, atomically.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import io
import json
import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm import tqdm

from ..errors import DataError
from ..io import atomic_write_json, atomic_write_text, sweep_stale_temps
from .checkpoint import (CHECKPOINT_NAME, check_compatible, check_same_schedule, load_checkpoint, resolve_resume,
                         rng_state, run_identity, save_checkpoint, set_rng_state)
from .config import EngineConfig
from .distributed import (World, all_gather_objects, all_reduce_sums, barrier, init_distributed, local_device,
                          shutdown)
from .precision import check_precision, make_grad_scaler, numerics, resolve_device
from .runtime import jsonable, seed_everything
from .schedule import warmup_schedule
from .step_log import StepLog
from .task import StepContext, TrainingTask, WeightAverage, trainable_state, trainable_state_keys, trained_towers

log = logging.getLogger(__name__)
MAX_SKIPPED_STEPS = 25  # fp16: this many overflowing steps in a row is divergence, not loss-scale search


class NonFiniteError(DataError):
    """Training produced a NaN or infinite loss or gradient; nothing is saved from it."""


@dataclass(frozen=True)
class Runtime:
    device: torch.device  # this process's device (cuda:LOCAL_RANK under torchrun)
    world: World
    precision: str = "fp32"

    @functools.cached_property  # read once (the CPU's name comes from /proc/cpuinfo): logged, then recorded
    def numerics(self) -> dict[str, Any]:
        """What this run's numbers depend on beyond its config: torch, the device, the CPU's kernels and threads."""
        return numerics(self.device, self.precision)


@contextlib.contextmanager
def runtime(cfg: EngineConfig) -> Iterator[Runtime]:
    """Threads, device, precision check, the torchrun process group and the seeds of one run (the caller's thread
    count is back when it ends: `train()` from a program leaves its process as it found it)."""
    if cfg.threads and cfg.threads < 1:
        raise DataError(f"--threads must be at least 1, got {cfg.threads}")
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)  # on shared cores, fewer threads than cores is faster
    try:
        device = resolve_device(cfg.device)
        check_precision(cfg.precision, device)
        world = init_distributed(device)
        try:
            seed_everything(cfg.seed)
            rt = Runtime(local_device(device, world), world, cfg.precision)
            if world.is_main:
                log.info("numerics: %s", ", ".join(f"{k} {v}" for k, v in rt.numerics.items() if v is not None))
            yield rt
        finally:
            shutdown(world)
    finally:
        torch.set_num_threads(threads)


@dataclass
class FitResult:
    history: list[dict[str, Any]]
    best: dict[str, Any] | None  # {"epoch": N, **validation metrics} of the epoch kept (the last without selection)
    completed: bool  # False when --stop-after ended the run before its last epoch


class Trainer:
    """Runs a `TrainingTask` under an `EngineConfig`."""

    def __init__(self, task: TrainingTask, cfg: EngineConfig, rt: Runtime) -> None:
        self.task, self.cfg, self.device, self.world = task, cfg, rt.device, rt.world
        self.out = Path(cfg.out)
        self.params = [p for p in task.model.parameters() if p.requires_grad]
        if not self.params:
            raise DataError("nothing to train: every parameter of the model is frozen")
        self.optimizer = task.configure_optimizer(cfg.lr, cfg.weight_decay)
        steps = task.steps_per_epoch()
        if cfg.schedule_epochs is not None and cfg.schedule_epochs < cfg.epochs:
            raise DataError(f"schedule_epochs {cfg.schedule_epochs}: expected at least the run's {cfg.epochs} epochs")
        self.scheduler = warmup_schedule(self.optimizer, int(cfg.warmup_epochs * steps),
                                         cfg.schedule_length * steps, cfg.lr_schedule, steps)
        self.scaler = make_grad_scaler(cfg.precision, self.device)
        self.context = StepContext(cfg.precision, self.device, self.scaler)
        self.state_keys = trainable_state_keys(task.model)
        if cfg.grad_checkpointing:
            self._checkpoint_towers()
        model = torch.compile(task.model) if cfg.compile else task.model
        if self.world.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                                              find_unused_parameters=task.idle_parameters)
        self.model = model
        self.ema = WeightAverage(task.model, self.state_keys, cfg.ema_decay) if cfg.ema_decay else None
        self.skipped_in_a_row = 0
        if cfg.sync_every < 0:
            raise DataError(f"--sync-every must be 0 (automatic) or more, got {cfg.sync_every}")
        # a read of the step values waits for the device: on a GPU read them in batches; fp16's scaler syncs anyway
        self.sync_every = 1 if self.scaler is not None else cfg.sync_every or (1 if self.device.type == "cpu" else 32)
        self._progress: tuple[list, dict | None, dict | None] = ([], None, None)  # history, best, best state
        if cfg.checkpoint_every and not task.resumable_mid_epoch:
            raise DataError(f"--checkpoint-every {cfg.checkpoint_every}: this command checkpoints at epoch ends only")
        if cfg.checkpoint_every < 0:
            raise DataError(f"--checkpoint-every must be 0 (epoch ends only) or more, got {cfg.checkpoint_every}")
        self.identity = run_identity(json.loads(json.dumps(jsonable({**task.identity(), "seed": cfg.seed,
                                                                     "ema_decay": cfg.ema_decay}))),
                                     task.path_settings)

    def _checkpoint_towers(self) -> None:
        towers = trained_towers(self.task.model)
        if not towers:
            raise DataError("--grad-checkpointing: no pretrained tower of this model trains, so there are no "
                            "activations to recompute (an image encoder trains with --encoder-mode finetune)")
        for tower in towers:
            tower.set_grad_checkpointing(True)
        log.info("gradient checkpointing: %s recompute their activations in the backward pass",
                 ", ".join(tower.label for tower in towers))

    # -- one optimizer step --------------------------------------------------------------------------------
    def train_step(self, item: Any, where: str) -> tuple[dict[str, torch.Tensor], int]:
        """The task's forward/backward of `item`, then the optimizer step; returns (the step's losses and gradient
        norm as device scalars, samples). With `sync_every` 1 they are checked on the host before the update;
        otherwise `StepLog.read` checks them at the next read, which stops the run there."""
        out = self.task.training_step(self.model, item, self.context)
        values = {k: torch.as_tensor(v, device=self.device).detach().float() for k, v in out.losses.items()}
        if self.sync_every == 1:
            for name, v in values.items():
                if not math.isfinite(value := float(v)):
                    raise self._non_finite(where, name, value)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        clip = self.cfg.clip_norm if self.cfg.clip_norm else float("inf")
        norm = torch.nn.utils.clip_grad_norm_([p for p in self.params if p.grad is not None], clip)
        if self.scaler is not None:  # fp16 (syncs anyway: the scaler reads its found-inf flag back every step)
            if math.isfinite(float(norm)):
                self.skipped_in_a_row = 0
            else:  # the scaler skips this step and lowers its scale
                self.skipped_in_a_row += 1
                if self.skipped_in_a_row >= MAX_SKIPPED_STEPS:
                    raise NonFiniteError(f"{where}: the fp16 gradients overflowed in {self.skipped_in_a_row} steps "
                                         f"in a row (loss scale now {self.scaler.get_scale():g}): the run "
                                         "diverged; try --precision bf16 or a lower --lr")
        elif self.sync_every == 1 and not math.isfinite(value := float(norm)):
            raise self._non_finite(where, "grad_norm", value)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.task.after_optimizer_step()
        if self.ema is not None:
            self.ema.update(self.task.model)
        values["grad_norm"] = norm.detach().float()
        return values, out.samples

    def _non_finite(self, where: str, name: str, value: float) -> NonFiniteError:
        what = "the gradient norm" if name == "grad_norm" else name
        when = ("stopped before any update from it" if self.sync_every == 1 else
                f"stopped at the next read of the step values (every {self.sync_every} steps), nothing saved after "
                "the last checkpoint")
        return NonFiniteError(f"{where}: {what} is {value}; {when} (a corrupt input or feature cache, or a learning "
                              "rate too high)")

    # -- one epoch -----------------------------------------------------------------------------------------
    def train_epoch(self, epoch: int, start_step: int = 0, carry: dict | None = None) -> dict[str, float]:
        """One epoch from `start_step` (a resumed one continues the `carry` of its checkpoint: sums, samples)."""
        self.task.model.train()
        sums = StepLog((carry or {}).get("totals", {}), (carry or {}).get("samples", 0), self._non_finite,
                       frozenset({"grad_norm"}) if self.scaler is not None else frozenset())
        skipped = (carry or {}).get("skipped_steps", 0)
        started = time.perf_counter() - (carry or {}).get("seconds", 0.0)
        steps, every = self.task.steps_per_epoch(), self.cfg.checkpoint_every
        items = self.task.train_steps(epoch, start_step) if start_step else self.task.train_steps(epoch)
        bar = tqdm(items, total=steps - start_step, desc=f"epoch {epoch + 1}/{self.cfg.epochs}", leave=False,
                   disable=not (self.cfg.progress and self.world.is_main))
        waited, asked = 0.0, time.perf_counter()
        for s, item in enumerate(bar, start_step):
            waited += time.perf_counter() - asked  # from asking for a batch to having it: the input pipeline's
            where = f"epoch {epoch + 1}, step {s + 1}"
            values, samples = self.train_step(item, where)
            skipped += self.skipped_in_a_row > 0
            sums.add(where, values, samples)
            if sums.pending >= self.sync_every:
                sums.read()
                bar.set_postfix(loss=f"{sums.mean('loss'):.3f}")
            if every and (s + 1) % every == 0 and s + 1 < steps:
                sums.read()
                sums.totals, sums.seen = self._checkpoint_within(epoch, s + 1, sums.totals, sums.seen, skipped,
                                                                 time.perf_counter() - started)
            asked = time.perf_counter()
        sums.read()
        seconds = time.perf_counter() - started
        elapsed = seconds - (carry or {}).get("seconds", 0.0)  # this run's part of the epoch
        totals, seen = all_reduce_sums(dict(sums.totals), sums.seen, self.world)  # every rank's samples count
        row = {k: v / max(seen, 1) for k, v in totals.items()}
        # input_wait_share: the part of the epoch spent waiting for batches. With the step values read back
        # every step the host cannot run ahead of the device, so what it waits for in the loop is input; with
        # --sync-every N it can queue up to N steps ahead, and a wait for input is still a wait the device may
        # not hide once that queue drains.
        row.update(lr=self.scheduler.get_last_lr()[0], seconds=seconds, samples_per_s=seen / max(seconds, 1e-9),
                   input_wait_share=min(1.0, waited / max(elapsed, 1e-9)), **self.task.epoch_summary())
        if self.scaler is not None:
            row.update(skipped_steps=skipped, loss_scale=self.scaler.get_scale())
        return row

    def _checkpoint_within(self, epoch: int, step: int, totals: dict, seen: int, skipped: int,
                           seconds: float) -> tuple[defaultdict, int]:
        """A checkpoint after `step` steps of `epoch`: the main process keeps the sums of every rank, the others
        start again from zero, so the epoch's final all-reduce counts each sample once."""
        totals, seen = all_reduce_sums(dict(totals), seen, self.world)
        if self.world.is_main:
            history, best, best_state = self._progress
            self._checkpoint(epoch - 1, history, best, best_state,
                             partial={"epoch": epoch, "step": step, "samples": seen, "totals": totals,
                                      "skipped_steps": skipped, "seconds": seconds})
            return defaultdict(float, totals), seen
        return defaultdict(float, {k: 0.0 for k in totals}), 0

    # -- the run -------------------------------------------------------------------------------------------
    def fit(self) -> FitResult:
        if self.world.is_main:
            sweep_stale_temps(self.out)  # checkpoint or bundle writes of a run that was killed
        start, history, best, best_state, partial = self._resume()
        last = self.cfg.epochs if self.cfg.stop_after is None else min(self.cfg.epochs, start + self.cfg.stop_after)
        selection = self.task.selection
        if self.world.is_main:
            self.task.on_fit_start()
        for epoch in range(start, last):
            self._progress = (history, best, best_state)  # what a checkpoint within this epoch keeps
            if partial is not None:
                row = {"epoch": epoch + 1, **self.train_epoch(epoch, partial["step"], partial)}
                partial = None
            else:
                row = {"epoch": epoch + 1, **self.train_epoch(epoch)}
            if self.world.is_main:
                note = ""
                with self._averaged():  # with --ema, the average is what is scored and kept
                    metrics = self.task.evaluate()
                    if metrics is not None and selection is not None and selection.better(
                            metrics[selection.metric], None if best is None else best[selection.metric]):
                        best, best_state = {"epoch": epoch + 1, **metrics}, trainable_state(self.task.model,
                                                                                          self.state_keys)
                if metrics is not None:
                    row.update({f"val_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
                    note = ", validation " + self.task.describe(metrics)
                    if selection is None:
                        best = {"epoch": epoch + 1, **metrics}
                    else:
                        note += f" (best {selection.metric} {best[selection.metric]:.4f} at epoch {best['epoch']})"
                history.append(row)
                log.info("epoch %d/%d: loss %.4f, %.1fs (%.0f%% of it waiting for input)%s", epoch + 1,
                         self.cfg.epochs, row["loss"], row["seconds"], 100 * row["input_wait_share"], note)
                self._write_history(history)
                self._checkpoint(epoch, history, best, best_state)
            barrier(self.world)
        if last < self.cfg.epochs:
            log.info("stopped after epoch %d of %d; continue with --resume latest", last, self.cfg.epochs)
            return FitResult(history, best, completed=False)
        if best_state:
            self.task.model.load_state_dict(best_state, strict=False)
            log.info("kept epoch %d (best validation %s)", best["epoch"], selection.metric)
        elif self.ema is not None:
            self.task.model.load_state_dict(self.ema.shadow, strict=False)
        return FitResult(history, best, completed=True)

    def _averaged(self):
        return self.ema.applied(self.task.model) if self.ema is not None else contextlib.nullcontext()

    def _checkpoint(self, epoch: int, history: list, best: dict | None, best_state: dict | None,
                    partial: dict | None = None) -> None:
        """`epoch`: the last one completed (-1: none); `partial`: where within the next one the run is."""
        state = {"epoch": epoch, "identity": json.dumps(self.identity),
                 "config": json.dumps(jsonable(dataclasses.asdict(self.cfg))),
                 "model": trainable_state(self.task.model, self.state_keys), "best_state": best_state or {},
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "rng": rng_state(), "history": json.dumps(history), "best": json.dumps(best),
                 "task": json.dumps(jsonable(self.task.state_dict())), "world_size": self.world.size}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if partial is not None:
            state["partial"] = json.dumps(partial)
        save_checkpoint(state, self.out / CHECKPOINT_NAME)

    def _agreed_resume(self) -> Path | None:
        """The checkpoint to resume from, which every rank must find: a rank starting fresh beside ranks that resume
        would train another model under the same gradients (and wait forever at the end), so all raise instead."""
        try:
            path, problem = resolve_resume(self.cfg.resume, self.out), None
        except DataError as e:
            path, problem = None, str(e)
        seen = all_gather_objects((path is not None, problem), self.world)
        problems = [f"rank {r}: {p}" if len(seen) > 1 else p for r, (_, p) in enumerate(seen) if p]
        if problems:
            raise DataError("; ".join(problems))
        found = [r for r, (has, _) in enumerate(seen) if has]
        if 0 < len(found) < len(seen):
            raise DataError(f"--resume {self.cfg.resume}: rank(s) {found} find a checkpoint in {self.out}, rank(s) "
                            f"{[r for r in range(len(seen)) if r not in found]} none: every process must read the "
                            "same --out (a shared file system)")
        return path

    def _resume(self) -> tuple[int, list, dict | None, dict | None, dict | None]:
        """(first epoch to run, history, best, best state, where within that epoch) from `--resume`, or a fresh
        start."""
        path = self._agreed_resume()
        if path is None:
            return 0, [], None, None, None
        state = load_checkpoint(path)
        if "identity" not in state:
            raise DataError(f"{path}: a checkpoint of an older medvqa (no run identity); start a new run")
        check_compatible(json.loads(state["identity"]), self.identity, path)
        saved_config = json.loads(state["config"]) if "config" in state else {}
        check_same_schedule(saved_config, self.cfg, path, self.task.resume_settings)
        if saved_config.get("precision", self.cfg.precision) != self.cfg.precision:
            # allowed: a run may move between machines (a GPU's bf16, a CPU's fp32), but its numbers then differ
            # from a run made in one precision throughout, and its run config names the last one only
            log.warning("%s: trained so far with --precision %s, continuing with %s", path,
                        saved_config["precision"], self.cfg.precision)
        if set(state["model"]) != set(self.state_keys):
            raise DataError(f"{path}: its trainable weights do not match this model's "
                            f"(e.g. {sorted(set(state['model']) ^ set(self.state_keys))[:3]})")
        self.task.model.load_state_dict(state["model"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            if "ema" not in state:
                raise DataError(f"{path}: saved without --ema; resume it without, or start a new run")
            self.ema.load_state_dict(state["ema"])
        set_rng_state(state["rng"])
        self.task.load_state_dict(json.loads(state["task"]))
        partial = json.loads(state["partial"]) if "partial" in state else None
        if partial is not None:
            partial["samples"] = partial["samples"] if self.world.is_main else 0  # the main process holds the sums
            partial["totals"] = partial["totals"] if self.world.is_main else {k: 0.0 for k in partial["totals"]}
            log.info("resumed from %s at epoch %d, step %d (%d samples seen in it)", path, partial["epoch"] + 1,
                     partial["step"], partial["samples"])
        else:
            log.info("resumed from %s after epoch %d", path, state["epoch"] + 1)
        return (state["epoch"] + 1, json.loads(state["history"]), json.loads(state["best"]),
                state["best_state"] or None, partial)

    def _write_history(self, history: list[dict]) -> None:
        atomic_write_json(self.out / "history.json", history)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for row in history for k in row)))
        writer.writeheader()
        writer.writerows(history)
        atomic_write_text(self.out / "history.csv", buf.getvalue())
