"""What the engine trains: a task object (open_clip's idea of a training step plus an evaluation).

A task owns its model, data and losses; the engine (`Trainer`) owns everything a training
run shares: precision, distributed data parallel, the optimizer step, the LR schedule,
checkpoints, resume, best-epoch selection and the history.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ContextManager, Iterable

import torch
from torch import Tensor, nn

from encoders.base import Freezable

from .precision import get_autocast


@dataclass
class StepOutput:
    """Named losses of one optimizer step ("loss" is the one backpropagated), and its sample count."""

    losses: dict[str, Tensor | float]
    samples: int


@dataclass(frozen=True)
class Selection:
    """Which epoch a run keeps: the best value of a validation metric (else the last epoch)."""

    metric: str
    mode: str = "max"  # max | min

    def better(self, value: float, best: float | None) -> bool:
        return best is None or (value > best if self.mode == "max" else value < best)


class StepContext:
    """What a task's `training_step` needs from the engine: autocast, backward, DDP accumulation."""

    def __init__(self, precision: str, device: torch.device, scaler: torch.amp.GradScaler | None) -> None:
        self.precision, self.device, self.scaler = precision, device, scaler

    def autocast(self) -> ContextManager:
        return get_autocast(self.precision, self.device)

    def backward(self, loss: Tensor) -> None:
        """Backpropagate `loss` (scaled against fp16 underflow when a GradScaler is in use)."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    @staticmethod
    def accumulate(model: nn.Module, last: bool) -> ContextManager:
        """Around the forward and backward of a micro-batch: DDP synchronises gradients on the last only."""
        if last or not hasattr(model, "no_sync"):
            return contextlib.nullcontext()
        return model.no_sync()


class TrainingTask:
    """Base class of the tasks `Trainer` runs; subclasses fill in the marked methods.

    `model` is the module that trains: every parameter with `requires_grad` is optimised,
    and what can change (see `trainable_state`) is what checkpoints and best-epoch
    selection keep."""

    model: nn.Module
    selection: Selection | None = None  # None: keep the last epoch
    resumable_mid_epoch: bool = False  # train_steps(epoch, start_step) repeats the rest of an epoch exactly
    path_settings: tuple[str, ...] = ()  # the identity's settings that name files or folders (made absolute)
    # some steps leave trainable parameters without a gradient (a fine-tuned encoder during a frozen warm start):
    # DDP must then look for them at every step instead of waiting for their gradients
    idle_parameters: bool = False
    # the task's own settings outside its identity that a resumed run must keep: optimizer settings (per-group rates,
    # the optimizer), whose state the checkpoint brings back, so other values would be recorded but not trained
    # with; and recipe settings that change training without changing a weight's shape (truncation, loss weights)
    resume_settings: tuple[str, ...] = ()

    # -- required ------------------------------------------------------------------------
    def configure_optimizer(self, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        raise NotImplementedError

    def steps_per_epoch(self) -> int:
        raise NotImplementedError

    def train_steps(self, epoch: int, start_step: int = 0) -> Iterable[Any]:
        """One item per optimizer step of `epoch` from `start_step` on, this rank's share (see
        `schedule.epoch_plan`); a task without `resumable_mid_epoch` is only called with start_step 0."""
        raise NotImplementedError

    def training_step(self, model: nn.Module, item: Any, step: StepContext) -> StepOutput:
        """Forward and backward (through `step`) of one item; `model` may be the DDP/compiled wrapper."""
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        """What must match for `--resume` to continue this run (data, model, batch order)."""
        raise NotImplementedError

    # -- optional ------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        """Called on the main process once the run has started or resumed, before the first epoch it runs."""

    def after_optimizer_step(self) -> None:
        """Called after every optimizer step (e.g. CLIP clamps its logit scale)."""

    def evaluate(self) -> dict[str, Any] | None:
        """Validation metrics after an epoch, on the main process; None when there is no validation."""
        return None

    def epoch_summary(self) -> dict[str, Any]:
        """Extra fields for this epoch's history row (e.g. CLIP's temperature)."""
        return {}

    def describe(self, metrics: dict[str, Any]) -> str:
        """`metrics` of `evaluate` as a short phrase for the epoch's log line."""
        return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))

    def state_dict(self) -> dict[str, Any]:
        """JSON-able progress of the task itself that a checkpoint keeps (e.g. metrics before training)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def trained_towers(model: nn.Module) -> list[Freezable]:
    """The pretrained towers in `model` that train (image encoders, text towers that are not frozen), outermost
    only: what `--grad-checkpointing` applies to."""
    towers: list[Freezable] = []
    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, Freezable):
                towers.extend([] if child.frozen else [child])
            else:
                visit(child)
    visit(model)
    return towers


def trainable_state_keys(model: nn.Module) -> list[str]:
    """The `state_dict` entries that training can change: trainable parameters, and the buffers
    of modules that have one (BatchNorm statistics of a fine-tuned encoder). A frozen encoder's
    weights and statistics are left out: they are the same at every epoch."""
    keys = []
    for prefix, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        trains = any(p.requires_grad for _, p in own)
        dot = f"{prefix}." if prefix else ""
        keys += [dot + n for n, p in own if p.requires_grad]
        if trains or not own:  # buffers of parameterless modules are cheap constants: keep them exact too
            keys += [dot + n for n, b in module.named_buffers(recurse=False) if b is not None
                     and n not in module._non_persistent_buffers_set]
    return keys


def trainable_state(model: nn.Module, keys: list[str]) -> dict[str, Tensor]:
    """A CPU copy of the `keys` entries of `model.state_dict()`."""
    state = model.state_dict()
    return {k: state[k].detach().to("cpu", copy=True) for k in keys}


class WeightAverage:
    """An exponential moving average of a model's trainable state (`trainable_state_keys`), on its device.

    The decay ramps up as min(decay, (1 + n) / (10 + n)) over the first updates, so the average is not
    dominated by the initial weights; integer buffers (BatchNorm's step count) are copied, not averaged."""

    def __init__(self, model: nn.Module, keys: list[str], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.keys, self.decay, self.updates = keys, decay, 0
        state = model.state_dict()
        self.shadow = {k: state[k].detach().clone() for k in keys}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        state = model.state_dict()
        for key, avg in self.shadow.items():
            if avg.is_floating_point():
                avg.mul_(d).add_(state[key].detach(), alpha=1 - d)
            else:
                avg.copy_(state[key])

    @contextlib.contextmanager
    def applied(self, model: nn.Module):
        """Within the block, `model` holds the averaged weights; afterwards its own again."""
        backup = trainable_state(model, self.keys)
        model.load_state_dict(self.shadow, strict=False)
        try:
            yield
        finally:
            model.load_state_dict(backup, strict=False)

    def state_dict(self) -> dict[str, Any]:
        return {"shadow": {k: v.detach().cpu() for k, v in self.shadow.items()}, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state["shadow"].items():
            self.shadow[key].copy_(value)
        self.updates = int(state["updates"])
