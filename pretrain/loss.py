"""Losses: symmetric InfoNCE over the global batch (features gathered across ranks), and masked-LM.

Gather semantics (as open_clip's ClipLoss with gather_with_grad, no local loss):
every rank gathers the image and text embeddings of all ranks, keeps its own
slice differentiable, and computes the loss of the whole global batch, so the
loss value is the same with 1 or N processes for the same global batch. Each
rank's backward gives the exact gradient of that loss for its own samples; DDP
then averages over ranks, i.e. divides by N: `ClipLoss.backward_scale` (= N)
undoes that, so the parameter gradient equals a single process's too. The exception is the
logit scale: every rank's loss depends on it wholly, so its gradient is complete on each rank
and `ContrastiveTask` passes it in at 1/N of its gradient (else it would count N times).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vqa.training.distributed import World, all_gather_with_grad


class ClipLoss(nn.Module):
    def __init__(self, world: World | None = None):
        super().__init__()
        self.world = world or World()

    @property
    def backward_scale(self) -> float:
        return float(self.world.size)

    def gather(self, x: Tensor) -> Tensor:
        """(B, E) on each rank -> (world * B, E), rank order; this rank's slice keeps its gradient."""
        return all_gather_with_grad(x, self.world)

    @staticmethod
    def global_loss(image: Tensor, text: Tensor, logit_scale: Tensor) -> Tensor:
        """Symmetric cross-entropy of the (N, N) similarity matrix; pair i is (image i, text i)."""
        logits = logit_scale * image.float() @ text.float().t()  # (N, N)
        labels = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2

    def forward(self, image_embeds: Tensor, text_embeds: Tensor, logit_scale: Tensor) -> Tensor:
        return self.global_loss(self.gather(image_embeds), self.gather(text_embeds), logit_scale)


class MaskedLMLoss(nn.Module):
    """Cross-entropy over the masked positions (labels -100 elsewhere); 0 when nothing is masked."""

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        if not bool((labels != -100).any()):
            return logits.sum() * 0.0  # keeps the graph (DDP) without a NaN
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
