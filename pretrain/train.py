"""`medvqa pretrain`: contrastive image-text pretraining (CLIP, + optional masked-LM) of an image encoder.

The image tower is any encoder of `encoders` (registered name, timm:<name>, folder, hub id);
the text tower a small transformer built here, the packaged MiniLM, or any Hugging Face
text model. OUT/encoder is the trained image tower for `medvqa train --encoder OUT/encoder`.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from vqa.checkpoint import (CHECKPOINT_NAME, check_compatible, load_checkpoint, resolve_resume, restore_optimization,
                            save_checkpoint)
from vqa.distributed import World, barrier, init_distributed, local_device, shutdown
from vqa.errors import DataError
from vqa.io import atomic_write_json, atomic_write_text
from vqa.precision import check_precision, make_grad_scaler, resolve_device
from vqa.runtime import seed_everything, write_run_config

from .config import PretrainConfig, build_parser, config_from_args, validate
from .data import CaptionPair, load_captions, shuffle_captions
from .evaluate import embed_images, embed_texts, evaluate, load_prompts, retrieval_metrics, summary_line
from .images import ImageTable, image_source
from .loss import ClipLoss, MaskedLMLoss
from .model import CLIPPretrainModel, ContrastiveConfig, load_clip_model
from .step import StepOptions, batch_plan, make_batch, step_seed, train_step
from .text import create_text_tower

log = logging.getLogger(__name__)
# What must match to resume: the data, the model and the order of the batches.
_IDENTITY = ("data", "format", "train_split", "exclude_vqa_rad", "shuffle_captions", "encoder", "encoder_args",
             "text", "text_args", "clip_model", "embed_dim", "freeze_text", "mlm_weight", "seed", "global_batch")


@dataclass
class Split:
    pairs: list[CaptionPair]
    images: object  # ImageTable | StreamingImages
    text: dict  # input_ids + attention_mask (N, L), or text_features (N, D) for a frozen tower


# -- setup -------------------------------------------------------------------------------------------------------
def _load_pairs(cfg: PretrainConfig) -> tuple[list[CaptionPair], list[CaptionPair]]:
    kw = dict(image_column=cfg.image_column, caption_column=cfg.caption_column, exclude_vqa_rad=cfg.exclude_vqa_rad)
    train = load_captions(cfg.data, cfg.train_split, cfg.format, **kw)
    if cfg.shuffle_captions:
        train = shuffle_captions(train, cfg.seed)
        log.warning("control run: training captions are shuffled across images")
    val = [] if cfg.val_split in ("none", "") else load_captions(cfg.data, cfg.val_split, cfg.format, **kw)
    return train, val


def build_model(cfg: PretrainConfig, captions: list[str]) -> CLIPPretrainModel:
    from encoders import create_encoder

    if cfg.clip_model:
        model = load_clip_model(cfg.clip_model)
        if cfg.embed_dim and cfg.embed_dim != model.config.embed_dim:
            raise DataError(f"--embed-dim {cfg.embed_dim} does not match the projection of {cfg.clip_model} "
                            f"({model.config.embed_dim})")
    else:
        try:
            encoder = create_encoder(cfg.encoder, **cfg.encoder_args)
        except (TypeError, OSError) as e:
            raise DataError(f"--encoder {cfg.encoder}: {e}") from None
        except (AssertionError, RuntimeError) as e:  # e.g. a timm ViT built for another image size
            raise DataError(f"--encoder {cfg.encoder} with {cfg.encoder_args}: {e} (a timm ViT needs its "
                            "img_size too: --encoder-arg 'model_kwargs={\"img_size\": 128, ...}')") from None
        text = create_text_tower(cfg.text, captions=captions, pooling=cfg.text_pooling, **cfg.text_args)
        embed = cfg.embed_dim or getattr(encoder.config, "projection_dim", None) or 256
        model = CLIPPretrainModel(encoder, text, ContrastiveConfig(embed, cfg.init_temperature))
    # LiT by default for a pretrained text model given with --text; a CLIP checkpoint is fine-tuned whole
    pretrained_text = cfg.clip_model is None and cfg.text not in _BUILT_TEXT
    frozen = cfg.freeze_text if cfg.freeze_text is not None else pretrained_text
    if frozen:
        model.text.freeze()
    if cfg.mlm_weight > 0:
        if frozen:
            raise DataError("--mlm-weight needs a trainable text tower; drop --freeze-text (or pass --train-text)")
        model.text.add_mlm_head()
    return model


_BUILT_TEXT = ("bert-tiny", "clip-text-tiny", "clip-text-b")


@torch.no_grad()
def text_table(model: CLIPPretrainModel, captions: list[str], device: torch.device) -> dict:
    """Tokens of every caption; a frozen tower's pooled features instead (computed once per run)."""
    tokens = model.text.tokenize(captions)
    if not model.text.frozen:
        return tokens
    feats = []
    for start in range(0, len(captions), 256):
        part = {k: v[start:start + 256].to(device) for k, v in tokens.items()}
        feats.append(model.text_features(part["input_ids"], part["attention_mask"]).float().cpu())
    return {"text_features": torch.cat(feats)}


def _param_groups(model: CLIPPretrainModel, cfg: PretrainConfig) -> list[dict]:
    """No weight decay on biases, norms, embeddings' gains and the logit scale (as CLIP)."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2 and "logit_scale" not in name
        is_text = name.startswith("text.model.")
        groups.setdefault((decay, is_text), []).append(p)
    text_lr = cfg.text_lr if cfg.text_lr is not None else cfg.lr
    return [{"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0, "lr": text_lr if is_text else cfg.lr}
            for (decay, is_text), ps in groups.items()]


def _schedule(optimizer, warmup: int, total: int):
    def factor(step: int) -> float:  # linear warmup, then cosine to 0
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# -- the loop ----------------------------------------------------------------------------------------------------
def train_one_epoch(ddp_model, model, split: Split, clip_loss, mlm_loss, optimizer, scheduler, scaler, params,
                    cfg: PretrainConfig, world: World, epoch: int, device: torch.device) -> dict:
    model.train()
    plan = batch_plan(len(split.pairs), cfg.batch_size, world, cfg.accum_steps, cfg.seed, epoch)
    opts = StepOptions(cfg.precision, cfg.clip_norm, cfg.mlm_weight, cfg.mlm_probability, cfg.augment)
    flat = [idx for step in plan for idx in step]  # micro-batches in order, for the image source
    images = split.images.batches([i.tolist() for i in flat])
    totals = {"loss": 0.0, "mlm_loss": 0.0, "grad_norm": 0.0}
    started = time.perf_counter()
    bar = tqdm(plan, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not (cfg.progress and world.is_main), leave=False)
    for s, step in enumerate(bar):
        micro = []
        for m, indices in enumerate(step):
            g = torch.Generator().manual_seed(step_seed(cfg.seed, epoch, s, m, world.rank))
            micro.append(make_batch(model, indices, next(images), split.text, device, opts, g))
        stats = train_step(ddp_model, model, micro, clip_loss, mlm_loss, optimizer, scaler, params, opts, device)
        scheduler.step()
        for k in totals:
            totals[k] += stats[k]
        bar.set_postfix(loss=f"{totals['loss'] / (s + 1):.3f}", t=f"{1 / float(model.scale().detach()):.3f}")
    seconds = time.perf_counter() - started
    n = max(len(plan), 1)
    row = {k: v / n for k, v in totals.items()}
    if cfg.mlm_weight <= 0:
        row.pop("mlm_loss")
    images_seen = len(plan) * cfg.batch_size * cfg.accum_steps * world.size
    return {**row, "temperature": 1 / float(model.scale().detach()), "lr": scheduler.get_last_lr()[0],
            "seconds": seconds, "images_per_s": images_seen / max(seconds, 1e-9)}


def _resume(cfg: PretrainConfig, run: dict, model, optimizer, scheduler, scaler) -> tuple[int, list, dict | None]:
    path = resolve_resume(cfg.resume, cfg.out)
    if path is None:
        return 0, [], None
    state = load_checkpoint(path)
    check_compatible(state["config"], {**asdict(cfg), **run}, _IDENTITY, path)
    model.load_state_dict(state["model"])
    restore_optimization(state, optimizer, scheduler, scaler)
    log.info("resumed from %s after epoch %d", path, state["epoch"] + 1)
    return state["epoch"] + 1, json.loads(state["history"]), json.loads(state["before"])


def _checkpoint(cfg, run, model, optimizer, scheduler, scaler, epoch, history, before) -> None:
    state = {"epoch": epoch, "config": {**asdict(cfg), **run}, "model": model.state_dict(),
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(),
             "history": json.dumps(history), "before": json.dumps(before)}
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    save_checkpoint(state, Path(cfg.out) / CHECKPOINT_NAME)


def _write_history(out: Path, history: list[dict]) -> None:
    atomic_write_json(out / "history.json", history)
    if history:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for row in history for k in row)))
        writer.writeheader()
        writer.writerows(history)
        atomic_write_text(out / "history.csv", buf.getvalue())


def _prepare(cfg: PretrainConfig, device: torch.device, world: World):
    train_pairs, val_pairs = _load_pairs(cfg)
    model = build_model(cfg, [p.caption for p in train_pairs]).to(device).channels_last_()
    enc = model.image_encoder
    train = Split(train_pairs, image_source([p.image for p in train_pairs], enc, cfg.image_cache,
                                            cfg.cache_limit_gb, cfg.workers, cfg.progress),
                  text_table(model, [p.caption for p in train_pairs], device))
    val = None
    if val_pairs and world.is_main:  # only the main process evaluates
        val = Split(val_pairs, ImageTable([p.image for p in val_pairs], enc.image_size, enc.in_chans,
                                          cfg.workers, cfg.progress), {})
    return model, train, val


def pretrain(cfg: PretrainConfig) -> dict:
    """Train; on the main process write OUT/encoder, OUT/clip, metrics.json, history.{json,csv}. Returns metrics."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    check_precision(cfg.precision, device)
    world = init_distributed(device)
    device = local_device(device, world)
    try:
        return _pretrain(cfg, world, device)
    finally:
        shutdown(world)


def _pretrain(cfg: PretrainConfig, world: World, device: torch.device) -> dict:
    seed_everything(cfg.seed)
    out = Path(cfg.out)
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_run_config(cfg, out)
    model, train, val = _prepare(cfg, device, world)
    run = {"global_batch": cfg.batch_size * cfg.accum_steps * world.size, "world_size": world.size}
    if len(train.pairs) < run["global_batch"]:
        raise DataError(f"{cfg.data}: {len(train.pairs)} training pairs, fewer than one global batch "
                        f"({run['global_batch']} = batch {cfg.batch_size} x accum {cfg.accum_steps} x "
                        f"{world.size} process(es)); lower --batch-size")
    prompts = load_prompts()
    steps_per_epoch = len(train.pairs) // run["global_batch"]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(_param_groups(model, cfg), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    scheduler = _schedule(optimizer, max(1, int(cfg.warmup_epochs * steps_per_epoch)), cfg.epochs * steps_per_epoch)
    scaler = make_grad_scaler(cfg.precision, device)
    start, history, before = _resume(cfg, run, model, optimizer, scheduler, scaler)
    if before is None and val is not None and world.is_main:
        before = evaluate(model, val.pairs, val.images, device, cfg.precision, prompts)
        log.info("before training: %s", summary_line(before))
    step_model = torch.compile(model) if cfg.compile else model
    ddp_model = step_model
    if world.distributed:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            step_model, device_ids=[device.index] if device.type == "cuda" else None)
    clip_loss, mlm_loss = ClipLoss(world), MaskedLMLoss()
    last = cfg.epochs if cfg.stop_after is None else min(cfg.epochs, start + cfg.stop_after)
    for epoch in range(start, last):
        stats = train_one_epoch(ddp_model, model, train, clip_loss, mlm_loss, optimizer, scheduler, scaler, params,
                                cfg, world, epoch, device)
        row = {"epoch": epoch + 1, **stats}
        if world.is_main:
            if val is not None:
                r = retrieval_metrics(embed_images(model, val.images, device, cfg.precision),
                                      embed_texts(model, [p.caption for p in val.pairs], device, cfg.precision))
                row.update(val_i2t_r10=r["i2t_r10"], val_t2i_r10=r["t2i_r10"], val_mean_recall=r["mean_recall"])
            history.append(row)
            log.info("epoch %d: loss %.4f, %.0f img/s%s", epoch + 1, stats["loss"], stats["images_per_s"],
                     f", validation i2t R@10 {row['val_i2t_r10']:.1f}" if val is not None else "")
            _write_history(out, history)
            _checkpoint(cfg, run, model, optimizer, scheduler, scaler, epoch, history, before)
        barrier(world)
    if last < cfg.epochs:
        log.info("stopped after epoch %d of %d; continue with --resume latest", last, cfg.epochs)
        return {"stopped_after_epoch": last, "history": history}
    return _finish(cfg, model, val, device, prompts, before, history, world) if world.is_main else {}


def _finish(cfg, model, val, device, prompts, before, history, world) -> dict:
    out = Path(cfg.out)
    after = evaluate(model, val.pairs, val.images, device, cfg.precision, prompts) if val is not None else None
    if after is not None:
        log.info("after training: %s", summary_line(after))
    model.image_encoder.save_pretrained(out / "encoder")
    model.save_pretrained(out / "clip")
    metrics = {"before": before, "after": after, "history": history,
               "protocol": {"split": cfg.val_split, "retrieval": "each image against every caption of the split; "
                            "ties (identical captions) resolved in favour of the pair",
                            "shuffled_captions": cfg.shuffle_captions, "model": "last epoch",
                            "world_size": world.size}}
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_args(build_parser().parse_args(argv))
    validate(cfg)
    metrics = pretrain(cfg)
    if metrics.get("after"):
        print(json.dumps({"out": cfg.out, "before": metrics["before"]["retrieval"],
                          "after": metrics["after"]["retrieval"],
                          "zero_shot": {k: v["accuracy"] for k, v in metrics["after"]["zero_shot"].items()}},
                         indent=2))
    return 0
