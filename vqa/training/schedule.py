"""The learning-rate schedule every run uses, and the order of the samples in each epoch."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import DataError
from .distributed import World


LR_SCHEDULES = ("cosine", "constant", "mevf-step")
# MEVF's released train.py (from BAN's): the rate x 0.5, 1, 1.5, 2 over the first four epochs, then held at 2x and
# cut by 0.75 at epochs 10, 12, 14, 16 and 18 (counted from 0), whatever the run's length.
MEVF_WARMUP = (0.5, 1.0, 1.5, 2.0)
MEVF_DECAY_EPOCHS, MEVF_DECAY_RATE = range(10, 20, 2), 0.75


def mevf_step_factor(epoch: int) -> float:
    """The multiple of the base rate that MEVF's schedule trains `epoch` (0-based) at."""
    if epoch < len(MEVF_WARMUP):
        return MEVF_WARMUP[epoch]
    return MEVF_WARMUP[-1] * MEVF_DECAY_RATE ** sum(e <= epoch for e in MEVF_DECAY_EPOCHS)


def check_schedule(lr_schedule: str, warmup: float, unit: str = "epochs") -> None:
    """A DataError for a schedule no run can use (checked before any work, and again where it is built)."""
    if lr_schedule not in LR_SCHEDULES:
        raise DataError(f"--lr-schedule {lr_schedule!r}: expected one of {', '.join(LR_SCHEDULES)}")
    if lr_schedule == "mevf-step" and warmup > 0:  # two warmups would compound: say so rather than pick one
        raise DataError(f"--lr-schedule mevf-step warms up on its own (the rate x 0.5, 1, 1.5, 2 over the first four "
                        f"epochs): pass --warmup-epochs 0 (got a warmup of {warmup:g} {unit})")


def warmup_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, after: str = "cosine",
                    steps_per_epoch: int = 1):
    """Linear warmup over `warmup_steps`, then (`after`) cosine decay to 0 at `total_steps`, or the rate held
    constant (a LambdaLR); "mevf-step" is MEVF's epoch-wise schedule, its own warmup included."""
    check_schedule(after, warmup_steps, "steps")
    if after == "mevf-step":
        per_epoch = max(1, steps_per_epoch)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: mevf_step_factor(step // per_epoch))
    warmup, total = max(1, warmup_steps), max(1, total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if after == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass(frozen=True)
class Shard:
    """This rank's part of one global (micro-)batch.

    `share` = world size x this rank's samples / the global batch's samples: a rank multiplies
    its mean loss by it, so that DDP's average over ranks is the mean over the global batch
    (1.0 whenever the batch splits evenly, and always in a single process). `offset` and `of`: where
    its samples stand in the global (micro-)batch and how large that is (None: this shard alone), so a
    random draw per sample (augmentation) can be made for the global batch and sliced, as one process
    would draw it. `batch`: the global (micro-)batch's indices, every rank's (None: this shard alone), for
    a loss whose normaliser is counted over the batch (QCR's per-branch means)."""

    indices: Tensor
    share: float = 1.0
    offset: int = 0
    of: int | None = None
    batch: Tensor | None = None

    @property
    def whole(self) -> Tensor:
        """The indices of the global (micro-)batch this shard is part of (its own in one process)."""
        return self.indices if self.batch is None else self.batch

    @property
    def draws(self) -> tuple[int, int]:
        """(offset, global size): what `vqa.training.augment.augment` and the like draw for, then slice."""
        return self.offset, self.of if self.of is not None else len(self)

    def __len__(self) -> int:
        return int(self.indices.numel())


def epoch_plan(n: int, batch_size: int, world: World, seed: int, epoch: int, accum: int = 1,
               drop_last: bool = True) -> list[list[Shard]]:
    """For this rank: optimizer steps -> micro-batches -> the sample indices it takes.

    The order is a permutation drawn from (seed, epoch), the same on every rank, so a
    resumed run repeats it. Step s takes the global batch perm[s*G:(s+1)*G] with
    G = batch_size x world x accum; micro-batch m of it is split across ranks in rank
    order. So 1 process with batch 2B and 2 processes with batch B see the same global
    batches. With `drop_last=False` the last, smaller global batch is kept (split as evenly
    as ranks allow) unless it cannot give every rank a sample."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7_919 + epoch))
    micro_global = batch_size * world.size
    step_global = micro_global * accum
    steps = []
    for s in range(n // step_global):
        chunk = perm[s * step_global:(s + 1) * step_global]
        steps.append([Shard(chunk[m * micro_global + world.rank * batch_size:
                                  m * micro_global + (world.rank + 1) * batch_size],
                            offset=world.rank * batch_size, of=micro_global,
                            batch=chunk[m * micro_global:(m + 1) * micro_global])
                      for m in range(accum)])
    rest = perm[(n // step_global) * step_global:]
    if not drop_last and len(rest) >= world.size:
        micro = [rest[i:i + micro_global] for i in range(0, len(rest), micro_global)]
        if all(len(m) >= world.size for m in micro):
            steps.append([Shard(parts[world.rank], world.size * len(parts[world.rank]) / len(m),
                                offset=sum(len(p) for p in parts[:world.rank]), of=len(m), batch=m)
                          for m in micro for parts in [torch.tensor_split(m, world.size)]])
    return steps
