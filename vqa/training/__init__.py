"""The training engine every medvqa task runs on: precision, distributed, checkpoints, schedule, one loop.

    from vqa.training import EngineConfig, Trainer, TrainingTask, runtime

Modules: config (EngineConfig, the shared fields), task (TrainingTask, StepContext, StepOutput,
Selection, trainable state), engine (Trainer.fit, runtime, NonFiniteError), precision (devices,
autocast, GradScaler), distributed (torchrun world, gathers), checkpoint (atomic save, resume,
RNG state), schedule (warmup, then cosine or constant, or MEVF's steps; the per-epoch batch plan), runtime (seeds, run config).
"""
from .config import EngineConfig
from .distributed import World
from .engine import FitResult, NonFiniteError, Runtime, Trainer, runtime
from .precision import check_precision, get_autocast, make_grad_scaler, resolve_device
from ..io import LOCAL_PATH
from .runtime import seed_everything, shareable_config, write_run_config
from .schedule import LR_SCHEDULES, Shard, epoch_plan, warmup_schedule
from .task import Selection, StepContext, StepOutput, TrainingTask

__all__ = [
    "EngineConfig", "FitResult", "LOCAL_PATH", "LR_SCHEDULES", "NonFiniteError", "Runtime", "Selection", "Shard",
    "StepContext", "StepOutput", "Trainer", "TrainingTask", "World", "check_precision", "epoch_plan", "get_autocast",
    "make_grad_scaler", "resolve_device", "runtime", "seed_everything", "shareable_config", "warmup_schedule",
    "write_run_config",
]
