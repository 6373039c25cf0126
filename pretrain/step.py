"""One optimizer step of contrastive pretraining: batch plan, accumulation over micro-batches, MLM.

Batch plan: the order of the pairs is a permutation drawn from (seed, epoch), the
same on every rank. Optimizer step s takes the global batch
perm[s*G : (s+1)*G] with G = batch_size * world * accum_steps; micro-batch m of it
is split across ranks in rank order. So 1 process with batch 2B and 2 processes
with batch B see the same global batches, and a resumed run repeats the order.

Accumulation keeps the contrastive negatives of the whole accumulated batch (as
open_clip's accum_freq): a first pass without gradients embeds every
micro-batch; then each micro-batch is embedded again with gradients and its
loss is the loss of the full batch with its own slice fresh. The sum of these
gradients is the gradient of the full-batch loss. The logit scale is live in
the last micro-pass only (the one DDP synchronises), so its gradient is counted once.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from vqa.distributed import World
from vqa.precision import backward_step, get_autocast

from .images import augment, normalize
from .loss import ClipLoss, MaskedLMLoss
from .text import mask_tokens


@dataclass
class StepOptions:
    precision: str
    clip_norm: float | None
    mlm_weight: float = 0.0
    mlm_probability: float = 0.15
    augment: bool = False


def step_seed(seed: int, epoch: int, step: int, micro: int, rank: int) -> int:
    """A generator seed for one micro-batch (augmentation, MLM masks): resuming repeats it."""
    return (((seed * 1_000_003 + epoch) * 100_003 + step) * 1_009 + micro) * 101 + rank


def batch_plan(n: int, batch_size: int, world: World, accum: int, seed: int, epoch: int) -> list[list[Tensor]]:
    """For this rank: steps -> micro-batches -> pair indices (drop_last, full global batches only)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7_919 + epoch))
    micro_global = batch_size * world.size
    step_global = micro_global * accum
    steps = []
    for s in range(n // step_global):
        chunk = perm[s * step_global:(s + 1) * step_global]
        steps.append([chunk[m * micro_global + world.rank * batch_size:m * micro_global + (world.rank + 1) * batch_size]
                      for m in range(accum)])
    return steps


def make_batch(model, indices: Tensor, pixels: Tensor, text: dict[str, Tensor], device: torch.device,
               opts: StepOptions, generator: torch.Generator) -> tuple[dict[str, Tensor], Tensor | None]:
    """Model inputs for one micro-batch (+ MLM labels). `pixels` are the batch's uint8 images."""
    if opts.augment:
        pixels = augment(pixels, generator)
    batch = {"pixels": normalize(pixels, model.image_encoder, device).contiguous(memory_format=torch.channels_last)}
    if "text_features" in text:
        batch["text_features"] = text["text_features"][indices].to(device)
        return batch, None
    ids, mask = text["input_ids"][indices], text["attention_mask"][indices]
    length = int(mask.sum(1).max())
    ids, mask = ids[:, :length], mask[:, :length]  # trim padding to the longest caption of the batch
    batch["input_ids"], batch["attention_mask"] = ids.to(device), mask.to(device)
    labels = None
    if opts.mlm_weight > 0:
        masked, labels = mask_tokens(ids, mask, model.text.tokenizer, model.text.vocab_size, opts.mlm_probability,
                                     generator)
        batch["mlm_input_ids"], labels = masked.to(device), labels.to(device)
    return batch, labels


def _mlm(out: dict, labels: Tensor | None, mlm_loss: MaskedLMLoss) -> Tensor | None:
    return None if labels is None else mlm_loss(out["mlm_logits"], labels)


def train_step(ddp_model, model, micro: Sequence[tuple[dict, Tensor | None]], clip_loss: ClipLoss,
               mlm_loss: MaskedLMLoss, optimizer, scaler, params: list, opts: StepOptions,
               device: torch.device) -> dict[str, float]:
    """Forward/backward over the micro-batches and one optimizer step; returns loss values and the grad norm."""
    k = len(micro)
    cached_img: list[Tensor] = []
    cached_txt: list[Tensor] = []
    if k > 1:
        with torch.no_grad(), get_autocast(opts.precision, device):
            for batch, _ in micro:
                out = model(batch)
                cached_img.append(clip_loss.gather(out["image_embeds"].float()))
                cached_txt.append(clip_loss.gather(out["text_embeds"].float()))
    stats = {"loss": 0.0, "mlm_loss": 0.0}
    norm = 0.0
    for j, (batch, labels) in enumerate(micro):
        last = j == k - 1
        sync = contextlib.nullcontext() if last or not hasattr(ddp_model, "no_sync") else ddp_model.no_sync()
        with sync:
            with get_autocast(opts.precision, device):
                out = ddp_model(batch)
            img, txt = clip_loss.gather(out["image_embeds"]), clip_loss.gather(out["text_embeds"])
            if k > 1:
                img = torch.cat([*cached_img[:j], img, *cached_img[j + 1:]])
                txt = torch.cat([*cached_txt[:j], txt, *cached_txt[j + 1:]])
            scale = out["logit_scale"] if last else out["logit_scale"].detach()
            loss = clip_loss.global_loss(img, txt, scale)
            total = loss * clip_loss.backward_scale
            mlm = _mlm(out, labels, mlm_loss)
            if mlm is not None:
                total = total + opts.mlm_weight * mlm / k
                stats["mlm_loss"] += float(mlm.detach()) / k
            if last:
                norm = backward_step(total, optimizer, scaler, params, opts.clip_norm)
            else:
                (scaler.scale(total) if scaler is not None else total).backward()
        stats["loss"] = float(loss.detach())
    model.clamp_logit_scale_()
    stats["grad_norm"] = norm
    return stats
