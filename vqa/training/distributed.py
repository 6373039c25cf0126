"""The one place for distributed training: world info from torchrun's environment, gathers."""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)


def init_distributed(device: torch.device) -> World:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK); single process otherwise.

    NCCL on GPUs, gloo on CPU (how the tests run two processes on one machine).
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    world = World(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), size)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(world.local_rank)
        # ranks wait in a collective while rank 0 works alone (filling the feature cache, evaluating, calibrating,
        # merging cache parts): NCCL's default 10 minutes would abort them mid-way
        dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
        log.info("rank %d/%d joined the %s process group", world.rank, size, backend)
    return world


def local_device(device: torch.device, world: World) -> torch.device:
    """The GPU of this process under torchrun (cuda:LOCAL_RANK); CPU stays CPU."""
    return torch.device("cuda", world.local_rank) if device.type == "cuda" and world.distributed else device


def all_gather_with_grad(x: torch.Tensor, world: World) -> torch.Tensor:
    """Concatenate `x` from every rank along dim 0, keeping this rank's slice differentiable."""
    if not world.distributed:
        return x
    gathered = [torch.zeros_like(x) for _ in range(world.size)]
    dist.all_gather(gathered, x.contiguous())
    gathered[world.rank] = x  # gradients flow through the local part; other ranks handle theirs
    return torch.cat(gathered, dim=0)


def all_reduce_mean(value: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        value = value.clone()
        dist.all_reduce(value)
        value /= world.size
    return value


def all_reduce_sums(totals: dict[str, float], count: int, world: World) -> tuple[dict[str, float], int]:
    """Sum per-rank totals (and a sample count) over all ranks; every rank must pass the same keys."""
    if not world.distributed:
        return totals, count
    keys = sorted(totals)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    values = torch.tensor([float(count)] + [totals[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    values = values.cpu()
    return dict(zip(keys, values[1:].tolist())), int(values[0])


def all_gather_objects(obj, world: World) -> list:
    """`obj` (picklable) of every rank, in rank order; [obj] in a single process."""
    if not world.distributed:
        return [obj]
    gathered: list = [None] * world.size
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


@contextlib.contextmanager
def main_process_first(world: World):
    """Rank 0 runs the block first (filling a shared cache, say); the other ranks then run it (reading it)."""
    if not world.is_main:
        barrier(world)
    yield
    if world.is_main:
        barrier(world)


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
