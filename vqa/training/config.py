"""The fields every training run shares; `vqa.train.TrainConfig` and `pretrain.PretrainConfig` extend it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass
class EngineConfig:
    # How one invocation runs, not what it trains: a rerun from a recorded run_config.json (--config) takes these
    # from its own command line (the recorded run's folder, its resume and its stop are not the rerun's).
    INVOCATION_FIELDS: ClassVar[tuple[str, ...]] = ("out", "resume", "stop_after", "progress")

    # optimisation
    epochs: int = 20
    batch_size: int = 64  # per process; the global batch is batch_size x processes x accum_steps
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_epochs: float = 1.0  # linear warmup, then the schedule
    lr_schedule: str = "cosine"  # after the warmup: "cosine" decay to 0, or "constant" (QCR's released code never
    #                              changes its rate); "mevf-step": MEVF's released schedule, its own warmup included
    schedule_epochs: int | None = None  # the schedule's length (default: epochs); longer stops the run partway down
    #                                    its decay, where a longer run of the same recipe would be at that epoch
    clip_norm: float | None = 1.0  # gradient-norm clipping; 0 or None: none
    ema_decay: float | None = None  # keep an exponential moving average of the weights (e.g. 0.999): it is
    #                                 what validation scores, selection keeps and the run returns
    # runtime
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16: CUDA, with a GradScaler)
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun: the rank's GPU)
    compile: bool = False  # torch.compile the model
    grad_checkpointing: bool = False  # the trained towers recompute their activations in the backward pass: less
    #                                   memory, about one more forward of compute; the same gradients
    sync_every: int = 0  # read the step's losses and gradient norm back to the host every N optimizer steps: a
    #                      read waits for the device to finish (0: automatic: every step on a CPU, every 32 on a
    #                      GPU; always every step with fp16, whose GradScaler reads its overflow flag anyway)
    threads: int | None = None  # CPU threads for torch (default: torch's choice, one per core)
    seed: int = 0
    # outputs
    out: str = "runs/run"
    resume: str | None = None  # "latest" (OUT/checkpoint.pt) or a checkpoint path
    checkpoint_every: int = 0  # also checkpoint every N optimizer steps within an epoch (0: at epoch ends only);
    #                            resuming continues after the last step saved (tasks that can: pretraining)
    stop_after: int | None = None  # end this run after N epochs (continue later with --resume latest)
    progress: bool = True  # progress bars

    @property
    def schedule_length(self) -> int:
        """The learning-rate schedule's length in epochs: `schedule_epochs`, else the run's own `epochs`."""
        return self.schedule_epochs or self.epochs
