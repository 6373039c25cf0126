"""CLIP pretraining (`medvqa pretrain`): contrastive image-text training (+ optional masked-LM) of an image
encoder, as a task on the engine (`vqa.training`).

The image tower is any encoder of `encoders` (registered name, timm:<name>, folder, hub id);
the text tower a small transformer built here, the packaged MiniLM, or any Hugging Face
text model. OUT/encoder is the trained image tower for `medvqa train --encoder OUT/encoder`.

    metrics = pretrain(PretrainConfig(data="runs/phantom/captions", epochs=5, out="runs/p"))
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from encoders import ImageTable, image_source
from encoders.text import create_text_tower
from vqa.errors import DataError
from vqa.io import atomic_write_json
from vqa.training import Runtime, Trainer, World, runtime, write_run_config

from .config import PretrainConfig
from .data import CaptionPair, load_captions, shuffle_captions
from .evaluate import evaluate, load_prompts, summary_line
from .model import CLIPPretrainModel, ContrastiveConfig, load_clip_model
from .task import ContrastiveTask, Split

log = logging.getLogger(__name__)
_BUILT_TEXT = ("bert-tiny", "clip-text-tiny", "clip-text-b")


def _load_pairs(cfg: PretrainConfig) -> tuple[list[CaptionPair], list[CaptionPair]]:
    """(train, held-out) pairs of --data; no train pairs when --train-data streams shards instead."""
    kw = dict(image_column=cfg.image_column, caption_column=cfg.caption_column, exclude_vqa_rad=cfg.exclude_vqa_rad)
    train = [] if cfg.train_data else load_captions(cfg.data, cfg.train_split, cfg.caption_format, **kw)
    if cfg.shuffle_captions and cfg.train_data:
        raise DataError("--shuffle-captions needs the pairs in a table; it does not apply to --train-data shards")
    if cfg.shuffle_captions:
        train = shuffle_captions(train, cfg.seed)
        log.warning("control run: training captions are shuffled across images")
    val = [] if cfg.val_split in ("none", "") else load_captions(cfg.data, cfg.val_split, cfg.caption_format, **kw)
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


@torch.no_grad()
def text_table(model: CLIPPretrainModel, captions: list[str], device: torch.device) -> dict:
    """Tokens of every caption; a frozen tower's pooled features instead (computed once per run)."""
    tokens = model.text.tokenize(captions)
    if not model.text.frozen:
        return tokens
    log.info("encoding %d captions once with the frozen text tower", len(captions))
    feats = []
    for start in range(0, len(captions), 256):
        part = {k: v[start:start + 256].to(device) for k, v in tokens.items()}
        feats.append(model.text_features(part["input_ids"], part["attention_mask"]).float().cpu())
    return {"text_features": torch.cat(feats)}


def _train_split(cfg: PretrainConfig, pairs: list[CaptionPair], device: torch.device) -> tuple[CLIPPretrainModel,
                                                                                                 Split]:
    """The model and its training split: the pairs of --data in a table, or the --train-data shards streamed."""
    log.info("building the model (%s image tower, %s text tower)", cfg.clip_model or cfg.encoder,
             cfg.clip_model or cfg.text)
    if cfg.train_data:
        from .stream import ShardedPairs, check_vqa_rad_excluded, expand_shards

        paths = expand_shards(cfg.train_data)
        if cfg.exclude_vqa_rad:
            check_vqa_rad_excluded(paths, cfg.train_data)
        shards = ShardedPairs(paths, cfg.seed, cfg.shard_mix, cfg.train_num_samples, image_column=cfg.image_column,
                              caption_column=cfg.caption_column)
        # a built text tower's word vocabulary: the captions of the first shards, the same on every rank
        builds_vocab = cfg.clip_model is None and cfg.text in _BUILT_TEXT
        model = build_model(cfg, shards.sample_captions(cfg.vocab_captions) if builds_vocab else [])
        return model.to(device).channels_last_(), Split([], shards, {})
    model = build_model(cfg, [p.caption for p in pairs]).to(device).channels_last_()
    images = image_source([p.image for p in pairs], model.image_encoder, cfg.image_cache, cfg.cache_limit_gb,
                          cfg.workers, cfg.progress)
    return model, Split(pairs, images, text_table(model, [p.caption for p in pairs], device))


def _prepare(cfg: PretrainConfig, device: torch.device, world: World) -> ContrastiveTask:
    train_pairs, val_pairs = _load_pairs(cfg)
    model, train = _train_split(cfg, train_pairs, device)
    enc = model.image_encoder
    val = None
    if val_pairs and world.is_main:  # only the main process evaluates
        val = Split(val_pairs, ImageTable([p.image for p in val_pairs], enc.image_size, enc.in_chans,
                                          cfg.workers, cfg.progress), {})
    task = ContrastiveTask(cfg, model, train, val, device, world, prompts=load_prompts(cfg.prompts))
    if cfg.epochs and task.steps_per_epoch() == 0:
        n = (cfg.train_num_samples or len(train.images)) if train.streamed else len(train_pairs)
        raise DataError(f"{cfg.train_data or cfg.data}: {n} training pairs per epoch, fewer than one global batch "
                        f"({task.global_batch} = batch {cfg.batch_size} x accum {cfg.accum_steps} x "
                        f"{world.size} process(es)); lower --batch-size")
    return task


def pretrain(cfg: PretrainConfig) -> dict:
    """Train; on the main process write OUT/encoder, OUT/clip, metrics.json, history.{json,csv}. Returns metrics.

    `epochs=0` writes the untrained towers and their metrics: the control row of every comparison."""
    cfg.validate()
    with runtime(cfg) as rt:
        task = _prepare(cfg, rt.device, rt.world)
        if rt.world.is_main:
            Path(cfg.out).mkdir(parents=True, exist_ok=True)
            write_run_config(cfg, cfg.out)
        result = Trainer(task, cfg, rt).fit()
        if not result.completed:
            return {"stopped_after_epoch": result.history[-1]["epoch"] if result.history else 0,
                    "history": result.history}
        return _finish(cfg, task, result.history, rt) if rt.world.is_main else {}


def _finish(cfg: PretrainConfig, task: ContrastiveTask, history: list, rt: Runtime) -> dict:
    out, model = Path(cfg.out), task.model
    after = None
    if task.val is not None:
        after = evaluate(model, task.val.pairs, task.val.images, task.device, cfg.precision, task.prompts)
        log.info("after training: %s", summary_line(after))
    model.image_encoder.save_pretrained(out / "encoder")
    model.save_pretrained(out / "clip")
    metrics = {"before": task.before, "after": after, "history": history,
               "protocol": {"split": cfg.val_split, "retrieval": "each image against every caption of the split; "
                            "ties (identical captions) resolved in favour of the pair",
                            "shuffled_captions": cfg.shuffle_captions, "model": "last epoch",
                            "epochs": cfg.epochs, "world_size": rt.world.size},
               "numerics": rt.numerics}  # the kernels its numbers repeat on
    atomic_write_json(out / "metrics.json", metrics)
    return metrics
