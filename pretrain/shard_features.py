"""Encode every image of WebDataset tar shards into the feature cache (`medvqa cache-features --train-data`).

    summary = cache_shard_features(ShardFeaturesConfig(train_data="runs/shards", encoder="runs/pretrain/encoder"))

Keys: a shard member written by `medvqa shards` from a JPEG or PNG holds that file's own bytes, so
the sha256 of the member is `image_hash` of the source file: a VQA or classify run that later reads
the same files hits these rows. (Images the shard writer converted to PNG, e.g. DICOM or TIFF, are
keyed by the PNG's bytes, so only another shard-reading run would hit them.)

Under torchrun each rank takes a contiguous block of the shards in `expand_shards` order
(`shard_block`), encodes the images that the cache lacks into a part cache of its own
(CACHE/.parts-<job>/rank-NNNNN, the same verified format; each job's folder is its own, so two jobs on
one cache leave each other's parts alone, and a killed job's is swept), and after a barrier rank 0 merges the parts
in rank order (`FeatureCache.merge`: each row verified, temp files then rename). Blocks in rank
order are the shards in file order, so 1 process and N processes write the same cache, byte for
byte. One process is the same code with one part.

Bad members (an undecodable image, the rest of a truncated shard) are skipped with a warning
naming the shard and member, as the streaming reader does, and counted in the summary.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from encoders import FeatureCache, bytes_hash, create_encoder
from encoders.images import decode_image
from vqa.errors import DataError
from vqa.io import owned_dir
from vqa.training import distributed as dist_utils
from vqa.training import resolve_device

from .stream import _ShardReader, expand_shards, shard_counts

log = logging.getLogger(__name__)
PARTS_PREFIX = ".parts-"


@dataclass
class ShardFeaturesConfig:
    train_data: str  # shard pattern(s), as `medvqa pretrain --train-data` takes them
    encoder: str  # encoder name, save_pretrained folder or hub id (every rank must load the same weights)
    cache_dir: str | None = None  # cache root (default: $MEDVQA_CACHE/features)
    batch_size: int = 32  # images per forward pass, per process
    device: str = "auto"
    progress: bool = True


def shard_block(n_shards: int, rank: int, world: int) -> range:
    """The shards rank `rank` of `world` encodes: the r-th of `world` contiguous blocks of near-equal size."""
    base, extra = divmod(n_shards, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def cache_shard_features(cfg: ShardFeaturesConfig) -> dict:
    """Encode every image of `cfg.train_data` not cached yet into the encoder's feature cache; returns a summary
    (cache folder, shards, samples read, images added, bad members skipped, cached total) on every rank."""
    from vqa.features import cache_folder

    paths = expand_shards(cfg.train_data)  # a pattern matching nothing fails here, before any work
    if paths[0].suffix != ".tar":
        raise DataError(f"--train-data {cfg.train_data}: cache-features reads .tar shards, got {paths[0].suffix} "
                        "files")
    if cfg.batch_size < 1:
        raise DataError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    device = resolve_device(cfg.device)
    world = dist_utils.init_distributed(device)
    try:
        device = dist_utils.local_device(device, world)
        encoder = create_encoder(cfg.encoder).to(device).freeze()
        fingerprints = dist_utils.all_gather_objects(encoder.fingerprint(), world)
        if len(set(fingerprints)) > 1:
            raise DataError(f"--encoder {cfg.encoder}: the ranks built different weights (fingerprints "
                            f"{sorted({f[:12] for f in fingerprints})}); give a saved folder or pretrained weights")
        folder = cache_folder(encoder, cfg.cache_dir)
        with contextlib.ExitStack() as job:
            parts = None
            if world.is_main:
                cache = FeatureCache.open(folder, encoder)  # rebuilds a stale cache before any rank reads it
                shutil.rmtree(folder / ".parts", ignore_errors=True)  # a killed run's, from before folders per job
                parts = job.enter_context(owned_dir(folder, PARTS_PREFIX))  # removed when the job ends
            parts = dist_utils.all_gather_objects(parts, world)[0]  # the other ranks wait for rank 0 here
            if not world.is_main:
                cache = FeatureCache.open(folder)
            block = shard_block(len(paths), world.rank, world.size)
            part = FeatureCache.open(parts / f"rank-{world.rank:05d}", encoder)
            counts = {"samples": 0, "bad": 0}
            items = _block_images(paths, block, cache, counts, cfg.progress and world.is_main)
            part.add(items, batch_size=cfg.batch_size, device=device, progress=False)
            dist_utils.barrier(world)  # every part complete before rank 0 reads them
            added = cache.merge([parts / f"rank-{r:05d}" for r in range(world.size)]) if world.is_main else 0
        totals, _ = dist_utils.all_reduce_sums({k: float(v) for k, v in counts.items()} | {"added": float(added)},
                                               0, world)
        if not world.is_main:
            cache = FeatureCache.open(folder)
        summary = {"cache": str(folder), "shards": len(paths), "samples": int(totals["samples"]),
                   "added": int(totals["added"]), "bad": int(totals["bad"]), "cached": len(cache),
                   "grid": list(cache.grid_shape), "processes": world.size}
        log.info("cache-features: %s", summary)
        return summary
    finally:
        dist_utils.shutdown(world)


def _block_images(paths: Sequence[Path], block: range, cache: FeatureCache, counts: dict[str, int],
                  progress: bool) -> Iterator[tuple[str, object]]:
    """(hash, decoded image) of every sample of the shards in `block` that `cache` lacks, in shard and member
    order; the first of repeated images only; bad members logged and counted in counts["bad"]."""
    from tqdm import tqdm

    mine = [paths[j] for j in block]
    bar = tqdm(total=sum(shard_counts(mine)) if mine else 0, desc="cache-features", unit="img",
               disable=not progress)
    reader = _ShardReader(paths, keep=1)
    seen: set[str] = set()
    try:
        for j in block:
            for n in range(reader.num_samples(j)):
                data, _, member = reader.image_bytes(j, n)
                counts["samples"] += 1
                bar.update(1)
                h = bytes_hash(data)
                if h in cache or h in seen:
                    continue
                try:
                    image = decode_image(data, f"{paths[j]}: member {member}")
                except ValueError as e:
                    log.warning("skipped a bad sample: %s", e)
                    counts["bad"] += 1
                    continue
                seen.add(h)
                yield h, image
            if reader.damage(j):
                log.warning("skipped a bad sample: %s: %s; the samples after it are not cached", paths[j],
                            reader.damage(j))
                counts["bad"] += 1
    finally:
        bar.close()
        reader.close()
