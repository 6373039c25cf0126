"""Contrastive (CLIP) pretraining as a task on the engine: batches, accumulation, masked-LM.

Batch plan: `vqa.training.epoch_plan` over the pairs of a table, or `pretrain.stream`'s
order of sample positions over streamed shards (captions tokenized per batch); both give the
same global batches with 1 or N processes, and on resume, also from a step within an epoch.

Accumulation keeps the contrastive negatives of the whole accumulated batch (as open_clip's
accum_freq): a first pass without gradients embeds every micro-batch; then each micro-batch
is embedded again with gradients and its loss is the loss of the full batch with its own
slice fresh. The sum of these gradients is the gradient of the full-batch loss: each micro-batch's
second pass replays the random state of its first (the same dropout masks), and BatchNorm's
running statistics move once per micro-batch (the first pass's moves are undone). The logit
scale is live in the last micro-pass only (the one DDP synchronises), and at 1/N of its
gradient on each of N ranks, so it is counted once.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from encoders import normalize
from vqa.errors import DataError
from vqa.training import Selection, StepContext, StepOutput, TrainingTask, World, epoch_plan
from vqa.training.augment import augment
from vqa.training.schedule import Shard

from .config import PretrainConfig
from .data import CaptionPair
from .evaluate import embed_images, embed_texts, evaluate as evaluate_model, retrieval_metrics, summary_line
from .loss import ClipLoss, MaskedLMLoss
from .model import CLIPPretrainModel

log = logging.getLogger(__name__)
_TEXT_MODEL = "text.model."


@dataclass
class Split:
    pairs: list[CaptionPair]  # empty for shards
    images: Any  # encoders.ImageTable | encoders.StreamingImages | pretrain.stream.ShardedPairs (pixels + captions)
    text: dict  # input_ids + attention_mask (N, L), or text_features (N, D) for a frozen tower; {} for shards

    @property
    def streamed(self) -> bool:
        return not self.pairs


@dataclass
class Micro:
    """One micro-batch of a step: which pairs, their uint8 pixels, and where it sits in the run."""

    shard: Shard
    pixels: Tensor  # uint8 (B, C, S, S)
    epoch: int
    step: int
    index: int
    captions: list[str] | None = None  # streamed from shards: tokenized per batch (no table of the corpus)


def step_seed(seed: int, epoch: int, step: int, micro: int, rank: int) -> int:
    """A generator seed for one micro-batch (augmentation, MLM masks): resuming repeats it."""
    return (((seed * 1_000_003 + epoch) * 100_003 + step) * 1_009 + micro) * 101 + rank


class ContrastiveTask(TrainingTask):
    """Symmetric InfoNCE over the global batch (features gathered across ranks), + optional masked-LM."""

    selection: Selection | None = None  # the last epoch is the model, as CLIP trains
    resumable_mid_epoch = True  # the batch order is a function of (seed, epoch, step) alone
    path_settings = ("data", "encoder", "text")
    resume_settings = ("text_lr", "augment", "mlm_probability", "text_pooling")

    def __init__(self, cfg: PretrainConfig, model: CLIPPretrainModel, train: Split, val: Split | None,
                 device: torch.device, world: World, prompts: dict | None = None) -> None:
        self.cfg, self.model, self.train, self.val, self.device, self.world = cfg, model, train, val, device, world
        self.prompts = prompts or {}  # zero-shot prompt sets (pretrain.evaluate.load_prompts)
        self.clip_loss, self.mlm_loss = ClipLoss(world), MaskedLMLoss()
        self.before: dict | None = None  # retrieval and zero-shot before training (kept in the checkpoint)
        self.samples_seen = 0  # global samples of the steps handed out so far (kept in the checkpoint)

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.cfg.accum_steps * self.world.size

    def configure_optimizer(self, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        """AdamW as CLIP: no weight decay on biases, norms, gains and the logit scale; `text_lr` for the text model."""
        groups: dict[tuple[bool, bool], list] = {}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                decay = p.ndim >= 2 and "logit_scale" not in name
                groups.setdefault((decay, name.startswith(_TEXT_MODEL)), []).append(p)
        text_lr = self.cfg.text_lr if self.cfg.text_lr is not None else lr
        return torch.optim.AdamW([{"params": ps, "weight_decay": weight_decay if decay else 0.0,
                                   "lr": text_lr if is_text else lr} for (decay, is_text), ps in groups.items()],
                                 lr=lr, betas=(0.9, 0.98), eps=1e-6,
                                 fused=self.device.type == "cuda")  # one kernel per step, not one per tensor

    def _plan(self, epoch: int) -> list[list[Shard]]:
        return epoch_plan(len(self.train.pairs), self.cfg.batch_size, self.world, self.cfg.seed, epoch,
                          self.cfg.accum_steps, drop_last=True)

    def steps_per_epoch(self) -> int:
        if self.train.streamed:
            return self.train.images.steps_per_epoch(self.global_batch)
        return len(self.train.pairs) // self.global_batch

    def train_steps(self, epoch: int, start_step: int = 0):
        first = epoch * self.steps_per_epoch() * self.global_batch
        expected = first + start_step * self.global_batch
        if start_step and self.samples_seen != expected:
            raise DataError(f"resume at epoch {epoch + 1}, step {start_step}: the checkpoint has seen "
                            f"{self.samples_seen} samples, this plan expects {expected}")
        for s, step in enumerate(self._steps(epoch, start_step), start_step):
            self.samples_seen = first + (s + 1) * self.global_batch
            yield step

    def _steps(self, epoch: int, start_step: int):
        cfg, world = self.cfg, self.world
        if self.train.streamed:
            enc = self.model.image_encoder
            batches = self.train.images.micro_batches(epoch, start_step, cfg.batch_size, cfg.accum_steps,
                                                      world.rank, world.size, enc.image_size, enc.in_chans,
                                                      cfg.workers)
            for s in range(start_step, self.steps_per_epoch()):
                micro = [next(batches) for _ in range(cfg.accum_steps)]
                yield [Micro(Shard(torch.arange(len(b["captions"]))), b["pixels"], epoch, s, m, b["captions"])
                       for m, b in enumerate(micro)]
            return
        plan = self._plan(epoch)[start_step:]
        pixels = self.train.images.batches([shard.indices.tolist() for step in plan for shard in step])
        for s, step in enumerate(plan, start_step):
            yield [Micro(shard, next(pixels), epoch, s, m) for m, shard in enumerate(step)]

    # -- one step ------------------------------------------------------------------------------------------
    def make_batch(self, micro: Micro) -> tuple[dict[str, Tensor], Tensor | None]:
        """Model inputs for one micro-batch (+ MLM labels)."""
        from encoders.text import mask_tokens

        cfg, indices = self.cfg, micro.shard.indices
        text = self.train.text if micro.captions is None else self._caption_inputs(micro.captions)
        g = torch.Generator().manual_seed(step_seed(cfg.seed, micro.epoch, micro.step, micro.index, self.world.rank))
        pixels = augment(micro.pixels, g) if cfg.augment else micro.pixels
        batch = {"pixels": normalize(pixels, self.model.image_encoder, self.device)
                 .contiguous(memory_format=torch.channels_last)}
        if "text_features" in text:
            batch["text_features"] = text["text_features"][indices].to(self.device, non_blocking=True)
            return batch, None
        ids, mask = text["input_ids"][indices], text["attention_mask"][indices]
        length = int(mask.sum(1).max())
        ids, mask = ids[:, :length], mask[:, :length]  # trim padding to the longest caption of the batch
        # non_blocking: a blocking copy to a GPU also waits for every kernel queued before it (a host sync)
        batch["input_ids"] = ids.to(self.device, non_blocking=True)
        batch["attention_mask"] = mask.to(self.device, non_blocking=True)
        labels = None
        if cfg.mlm_weight > 0:
            masked, labels = mask_tokens(ids, mask, self.model.text.tokenizer, self.model.text.vocab_size,
                                         cfg.mlm_probability, g)
            batch["mlm_input_ids"] = masked.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
        return batch, labels

    @torch.no_grad()
    def _caption_inputs(self, captions: list[str]) -> dict:
        """What the text table holds, for one streamed batch: tokens, or a frozen tower's pooled features."""
        tokens = self.model.text.tokenize(captions)
        if not self.model.text.frozen:
            return tokens
        return {"text_features": self.model.text_features(tokens["input_ids"].to(self.device),
                                                          tokens["attention_mask"].to(self.device)).float()}

    def training_step(self, model, item: Sequence[Micro], step: StepContext) -> StepOutput:
        micro = [self.make_batch(m) for m in item]
        k, gather = len(micro), self.clip_loss.gather
        cached_img: list[Tensor] = []
        cached_txt: list[Tensor] = []
        replay: list[tuple[Tensor, Tensor | None]] = []
        if k > 1:
            statistics = [(b, b.clone()) for m in self.model.modules()
                          if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for b in m.buffers()]
            with torch.no_grad(), step.autocast():
                for batch, _ in micro:
                    replay.append(_random_state(self.device))
                    out = self.model(batch)
                    cached_img.append(gather(out["image_embeds"].float()))
                    cached_txt.append(gather(out["text_embeds"].float()))
            for buffer, before in statistics:
                buffer.copy_(before)
        losses: dict[str, Tensor | float] = {}
        mlm_total = torch.zeros((), device=self.device)  # a device scalar: reading it back would sync the step
        for j, (batch, labels) in enumerate(micro):
            last = j == k - 1
            if replay:
                _set_random_state(replay[j], self.device)
            with step.accumulate(model, last):
                with step.autocast():
                    out = model(batch)
                img, txt = gather(out["image_embeds"]), gather(out["text_embeds"])
                if k > 1:
                    img = torch.cat([*cached_img[:j], img, *cached_img[j + 1:]])
                    txt = torch.cat([*cached_txt[:j], txt, *cached_txt[j + 1:]])
                scale = out["logit_scale"] if last else out["logit_scale"].detach()
                if last and self.world.size > 1:
                    # every rank's loss is the whole batch's, so its logit-scale gradient is the whole gradient
                    # already: with backward_scale and DDP's mean it would count world-size times; keep 1/N of it
                    n = self.world.size
                    scale = scale / n + (scale - scale / n).detach()
                loss = self.clip_loss.global_loss(img, txt, scale)
                total = loss * self.clip_loss.backward_scale
                if labels is not None:
                    mlm = self.mlm_loss(out["mlm_logits"], labels)
                    total = total + self.cfg.mlm_weight * mlm / k
                    mlm_total = mlm_total + mlm.detach().float() / k
                step.backward(total)
            losses["loss"] = loss.detach()
        if self.cfg.mlm_weight > 0:
            losses["mlm_loss"] = mlm_total
        return StepOutput(losses, sum(len(m.shard) for m in item))

    def after_optimizer_step(self) -> None:
        self.model.clamp_logit_scale_()

    # -- evaluation and progress ---------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        if self.before is None and self.val is not None:
            self.before = evaluate_model(self.model, self.val.pairs, self.val.images, self.device, self.cfg.precision,
                                   self.prompts)
            log.info("before training: %s", summary_line(self.before))

    def evaluate(self) -> dict | None:
        if self.val is None:
            return None
        images = embed_images(self.model, self.val.images, self.device, self.cfg.precision)
        texts = embed_texts(self.model, [p.caption for p in self.val.pairs], self.device, self.cfg.precision)
        return retrieval_metrics(images, texts, images=[p.image for p in self.val.pairs],
                                 captions=[p.caption for p in self.val.pairs])

    def describe(self, metrics: dict) -> str:
        return f"i2t R@10 {metrics['i2t_r10']:.1f}, t2i R@10 {metrics['t2i_r10']:.1f}"

    def epoch_summary(self) -> dict:
        row = {"temperature": 1 / float(self.model.scale().detach())}
        if self.train.streamed:  # bad samples this process met so far (each rank logs and counts its own)
            row["bad_samples"] = self.train.images.skipped
        return row

    def identity(self) -> dict:
        keys = ("data", "caption_format", "train_split", "exclude_vqa_rad", "shuffle_captions", "encoder",
                "encoder_args", "text", "text_args", "clip_model", "embed_dim", "freeze_text", "mlm_weight")
        if self.cfg.train_data:  # only then: checkpoints of table runs stay resumable
            keys += ("train_data", "train_num_samples", "shard_mix")
        return {**{k: getattr(self.cfg, k) for k in keys}, "global_batch": self.global_batch}

    def state_dict(self) -> dict:
        return {"before": self.before, "samples_seen": self.samples_seen}

    def load_state_dict(self, state: dict) -> None:
        self.before = state.get("before")
        self.samples_seen = int(state.get("samples_seen", 0))


def _random_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    """What dropout draws from on `device`: torch's CPU generator, and the GPU's where it runs there."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_random_state(state: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
