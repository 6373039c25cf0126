"""An epoch's running sums of the step values (losses, gradient norm), read back from the device in batches.

Reading a GPU tensor on the host (`float(loss)`) makes the host wait until the device has
finished every kernel queued so far, so a loop that reads its loss each step can never queue
the next step's kernels while the device runs this one. `StepLog` keeps each step's values
as device scalars and reads the steps since the last read in one transfer: every N steps,
before a checkpoint and at the epoch's end. The sums are the same floats in the same order
as reading each step at once, so the history does not depend on N.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable

import torch
from torch import Tensor


class StepLog:
    """Sample-weighted sums of step values; `read` checks every pending step in order and raises
    `error(where, name, value)` at the first non-finite value (names in `tolerated` are dropped
    instead: an fp16 gradient norm on a step the GradScaler skipped)."""

    def __init__(self, totals: dict[str, float], seen: int, error: Callable[[str, str, float], Exception],
                 tolerated: frozenset[str] = frozenset()) -> None:
        self.totals: defaultdict[str, float] = defaultdict(float, totals)
        self.seen, self.error, self.tolerated = seen, error, tolerated
        self._pending: list[tuple[str, list[str], list[Tensor], int]] = []  # (where, names, values, samples)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def add(self, where: str, values: dict[str, Tensor], samples: int) -> None:
        """One step's values: detached float32 scalars on one device (what `Trainer.train_step` returns)."""
        self._pending.append((where, list(values), list(values.values()), samples))

    def read(self) -> None:
        """The pending steps' values on the host (one device sync), checked and added to the sums."""
        if not self._pending:
            return
        flat = torch.stack([v for *_, values, _ in self._pending for v in values]).cpu().tolist()
        pending, self._pending, i = self._pending, [], 0
        for where, names, _, samples in pending:
            for name, value in zip(names, flat[i:i + len(names)]):
                if math.isfinite(value):
                    self.totals[name] += value * samples
                elif name not in self.tolerated:
                    raise self.error(where, name, value)
            i += len(names)
            self.seen += samples

    def mean(self, name: str) -> float:
        return self.totals[name] / max(self.seen, 1)
