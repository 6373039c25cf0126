"""Streaming image-caption pairs from WebDataset tar shards (`medvqa pretrain --train-data`), in constant memory.

    shards = ShardedPairs(expand_shards("runs/shards/{000000..000009}.tar"), seed=0)
    for micro in shards.micro_batches(epoch=0, start_step=0, ...): ...

Why our own tar reader and not the `webdataset` package: training here needs the same global
batches with 1 or N processes and an exact resume from a sample count (the engine's promise
for the RAM table too), plus a warning naming the shard and member of each bad sample. That
needs random access by sample position, which webdataset's pipeline of shard-level splitting
and shuffle buffers does not give; reading a tar member is a seek and a read (`tarfile`).

The sample order is a pure function of (seed, position): pass p over the corpus permutes the
shards with (seed, p), takes them in groups of `mix` shards and permutes the samples of each
group together (so a batch mixes `mix` shards). Epoch e is positions [e*T*G, (e+1)*T*G) of the
endless sequence of passes, T = `--train-num-samples` // G steps of global batch G: nothing
is dropped, a remainder starts the next epoch. Step s, micro-batch m, rank r takes the B
positions at s*G + m*B*R + r*B; DataLoader worker w builds the micro-batches i with
i % workers == w, and the DataLoader's round-robin returns them in order. So ranks and workers
never read the same sample, 1 process with batch 2B sees the batches of 2 processes with B,
and resuming after k steps starts at position k*G: exactly the samples not yet seen.

Memory: per worker the member index of the shards of its current group (name -> offset,
size), never a table of the corpus. Each rank reads only its own samples' bytes.

Bad samples (a corrupt image, an image without a caption, members lost to a truncated tar)
are reported with shard and member, counted, and never trained on: its slot in the batch
takes a good sample this worker decoded before (every rank must keep the same batch size for
the gathered negatives), or another of the same batch for the first batch.
"""
from __future__ import annotations

import bisect
import functools
import glob
import io
import logging
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vqa.errors import DataError
from vqa.io import read_json

from .shards import IMAGE_EXTENSIONS, MANIFEST_NAME

log = logging.getLogger(__name__)
CAPTION_EXTENSIONS = ("txt", "caption")
_BRACE = re.compile(r"\{([^{}]*)\}")


# -- which shards ---------------------------------------------------------------------------------------------
def braceexpand(pattern: str) -> list[str]:
    """open_clip's shard patterns: `{000000..000009}` (zero-padded ranges) and `{a,b}` lists, nested left to right."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[:match.start()], pattern[match.end():]
    if ".." in body:
        lo, _, hi = body.partition("..")
        if not (lo.isdigit() and hi.isdigit()):
            raise DataError(f"{pattern!r}: a range needs numbers, e.g. {{000000..000009}}, got {{{body}}}")
        width = len(lo) if lo.startswith("0") else 0
        step = 1 if int(hi) >= int(lo) else -1
        options = [f"{i:0{width}d}" for i in range(int(lo), int(hi) + step, step)]
    else:
        options = body.split(",")
    return [out for option in options for out in braceexpand(head + option + tail)]


def expand_shards(spec: str | os.PathLike) -> list[Path]:
    """The shard files of `--train-data`: a folder (its *.tar), a brace pattern, a glob, or `::`-joined
    patterns. A pattern that matches no file, or names a shard that does not exist, is a DataError."""
    paths: list[Path] = []
    for part in str(spec).split("::"):
        if Path(part).is_dir():
            found = sorted(Path(part).glob("*.tar")) or _train_parquet(Path(part))
            if not found:
                raise DataError(f"--train-data {part}: a folder without .tar shards or .parquet files")
            paths += found
            continue
        names = braceexpand(part)
        if any(ch in part for ch in "*?["):
            names = [n for name in names for n in sorted(glob.glob(name))]
        existing = [Path(n) for n in names if Path(n).is_file()]
        if not existing:
            raise DataError(f"--train-data {part!r}: matches no file")
        if len(existing) < len(names):
            missing = [n for n in names if not Path(n).is_file()]
            raise DataError(f"--train-data {part!r}: {len(missing)} of its {len(names)} shards do not exist "
                            f"(e.g. {missing[0]})")
        paths += existing
    kinds = {p.suffix for p in paths}
    if len(kinds) > 1 or not kinds <= {".tar", ".parquet"}:
        raise DataError(f"--train-data {spec}: expected .tar shards or .parquet files (one kind), got {sorted(kinds)}")
    return paths


def check_vqa_rad_excluded(paths: Sequence[Path], spec: str) -> None:
    """--exclude-vqa-rad with --train-data: a stream cannot drop pairs as it reads them, so each shard folder's
    manifest must say its pairs were written without VQA-RAD's images (`medvqa shards --exclude-vqa-rad`)."""
    remedy = ("write the pairs as shards without them (`medvqa shards --data SOURCE --exclude-vqa-rad`) and train "
              "on those")
    if paths[0].suffix == ".parquet":
        raise DataError(f"--train-data {spec}: --exclude-vqa-rad cannot drop rows of .parquet files as they "
                        f"stream: {remedy}")
    for folder in sorted({p.parent for p in paths}):
        manifest = folder / MANIFEST_NAME
        if not manifest.is_file():
            raise DataError(f"--train-data {spec}: --exclude-vqa-rad, but {folder} has no manifest.json to say its "
                            f"shards were written without VQA-RAD's images: {remedy}")
        if not (read_json(manifest).get("source") or {}).get("exclude_vqa_rad"):
            raise DataError(f"--train-data {spec}: --exclude-vqa-rad, but {manifest} does not say its shards were "
                            f"written without VQA-RAD's images: {remedy}")


def _train_parquet(folder: Path) -> list[Path]:
    """A folder's .parquet files of the train split, as `datasets` lays splits out (`train-*.parquet` or a `train/`
    folder, any spelling of SPLIT_ALIASES); every file when none is named for a split. Another split's files in
    the training stream would leak validation or test pairs into training."""
    from .data import SPLIT_ALIASES

    files = sorted(folder.rglob("*.parquet"))

    def split_of(f: Path) -> str | None:  # hub layouts: data/train-00000-of-00001.parquet, default/partial-train/
        folders = [p.removeprefix("partial-") for p in f.relative_to(folder).parts[:-1]]
        return next((split for split, names in SPLIT_ALIASES.items() for name in names
                     if f.name.startswith(f"{name}-") or name in folders), None)

    named = {f: split_of(f) for f in files}
    if not any(named.values()):
        return files
    unnamed = [f.relative_to(folder) for f in files if named[f] is None]
    if unnamed:  # beside files of named splits, whose these are is anyone's guess
        raise DataError(f"--train-data {folder}: {len(unnamed)} .parquet file(s) named for no split beside files "
                        f"named for splits (e.g. {unnamed[0]}): name the ones to train on (a pattern)")
    train = [f for f in files if named[f] == "train"]
    if not train:
        raise DataError(f"--train-data {folder}: its .parquet files are named for the splits "
                        f"{sorted(set(named.values()))}, none for train (train-*.parquet or train/)")
    if len(train) < len(files):
        log.info("--train-data %s: the train split's %d .parquet files (%d of other splits left out)", folder,
                 len(train), len(files) - len(train))
    return train


def _member_key(name: str) -> tuple[str, str]:
    """`dir/000123.jpg` -> (`dir/000123`, `jpg`): WebDataset's key is the name up to the first dot of its base."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


@dataclass(frozen=True)
class ShardIndex:
    """Where each sample of one shard lies: per sample (key, image (offset, size), caption (offset, size) or None)."""

    path: Path
    samples: list[tuple[str, str, tuple[int, int], tuple[int, int] | None]]  # key, image member, image, caption
    truncated: str | None  # why reading stopped early, or None


def index_shard(path: Path) -> ShardIndex:
    """Read the headers of one shard (seeking over the data); a truncated tar keeps the members before the damage."""
    members: dict[str, dict[str, tuple[str, int, int]]] = {}
    order: list[str] = []
    truncated = None
    size = path.stat().st_size
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                if info.offset_data + info.size > size:
                    truncated = f"member {info.name} is cut short at byte {size}"
                    break
                key, ext = _member_key(info.name)
                if key not in members:
                    members[key] = {}
                    order.append(key)
                members[key][ext] = (info.name, info.offset_data, info.size)
    except (tarfile.TarError, EOFError, OSError) as e:
        truncated = f"unreadable after {len(order)} sample(s) ({e})"
    samples = []
    for key in order:
        parts = members[key]
        image = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)
        if image is None:
            continue  # a caption or json without an image is not a sample
        caption = next((parts[e][1:] for e in CAPTION_EXTENSIONS if e in parts), None)
        samples.append((key, image[0], image[1:], caption))
    return ShardIndex(path, samples, truncated)


def shard_counts(paths: Sequence[Path], progress: bool = False) -> list[int]:
    """Samples per shard: from the manifest.json beside the shards (`medvqa shards` writes it), else by reading
    the tar headers once (img2dataset's shards and others)."""
    manifests: dict[Path, dict[str, int]] = {}
    counts = []
    unknown = 0
    for path in paths:
        folder = path.parent
        if folder not in manifests:
            manifest = folder / MANIFEST_NAME
            manifests[folder] = ({s["name"]: int(s["samples"]) for s in read_json(manifest).get("shards", [])}
                                 if manifest.is_file() else {})
        count = manifests[folder].get(path.name)
        if count is None:
            unknown += 1
            count = len(index_shard(path).samples)
        counts.append(count)
    if unknown:
        log.info("counted the samples of %d shard(s) without a manifest from their tar headers", unknown)
    return counts


# -- the sample order --------------------------------------------------------------------------------------------
def _perm(n: int, *key: int) -> Tensor:
    seed = 0
    for k in key:
        seed = (seed * 1_000_003 + k) % (2**62)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


class SampleOrder:
    """Position in the endless sequence of passes -> (shard number, sample number in that shard)."""

    def __init__(self, counts: Sequence[int], seed: int, mix: int) -> None:
        if sum(counts) == 0:
            raise DataError("the shards hold no samples")
        self.counts, self.seed, self.mix, self.total = list(counts), seed, max(1, mix), sum(counts)

    @functools.lru_cache(maxsize=4)
    def _pass(self, p: int) -> tuple[list[list[int]], list[int]]:
        """The shard groups of pass p and their cumulative sample counts."""
        order = _perm(len(self.counts), self.seed, p).tolist()
        groups = [order[i:i + self.mix] for i in range(0, len(order), self.mix)]
        ends, total = [], 0
        for group in groups:
            total += sum(self.counts[j] for j in group)
            ends.append(total)
        return groups, ends

    @functools.lru_cache(maxsize=8)
    def _group(self, p: int, g: int) -> tuple[Tensor, list[int]]:
        groups, _ = self._pass(p)
        ends, total = [], 0
        for j in groups[g]:
            total += self.counts[j]
            ends.append(total)
        return _perm(total, self.seed, p, g, 1), ends

    def locate(self, position: int) -> tuple[int, int]:
        p, offset = divmod(position, self.total)
        groups, ends = self._pass(p)
        g = bisect.bisect_right(ends, offset)
        start = ends[g - 1] if g else 0
        perm, shard_ends = self._group(p, g)
        slot = int(perm[offset - start])
        i = bisect.bisect_right(shard_ends, slot)
        return groups[g][i], slot - (shard_ends[i - 1] if i else 0)


# -- reading ------------------------------------------------------------------------------------------------------
class _ShardReader:
    """Member bytes by (shard, sample number), keeping the indexes and open files of the last few shards."""

    def __init__(self, paths: Sequence[Path], keep: int, counts: Sequence[int] | None = None) -> None:
        self.paths, self.keep, self.counts = paths, keep, counts
        self.open: dict[int, tuple[ShardIndex, object]] = {}

    def _shard(self, j: int) -> tuple[ShardIndex, object]:
        if j not in self.open:
            if len(self.open) >= self.keep:
                _, f = self.open.pop(next(iter(self.open)))
                f.close()
            index = index_shard(self.paths[j])
            if self.counts is not None and len(index.samples) > self.counts[j]:
                # a stale manifest: the order has slots for its count only, the rest would go unread unnoticed
                log.warning("%s: holds %d samples, its manifest lists %d; the others are not read (rewrite the "
                            "manifest with `medvqa shards --overwrite`)", self.paths[j], len(index.samples),
                            self.counts[j])
            self.open[j] = (index, open(self.paths[j], "rb"))
        return self.open[j]

    def read(self, j: int, n: int) -> tuple[Image.Image, str, str] | str:
        """(image, caption, key) of sample n of shard j, or why it is bad (naming the member)."""
        index, f = self._shard(j)
        if n >= len(index.samples):
            why = index.truncated or "fewer samples than its manifest lists"
            return f"sample {n + 1} is missing: {why}"
        key, member, (offset, size), caption = index.samples[n]
        if caption is None:
            return f"member {member}: no caption (.txt) for key {key}"
        try:
            f.seek(offset)
            data = f.read(size)
            f.seek(caption[0])
            text = f.read(caption[1]).decode("utf-8").strip()
            with Image.open(io.BytesIO(data)) as img:
                img.load()  # decode now: a corrupt image fails here
                image = img.copy()
        except (OSError, SyntaxError, ValueError, UnicodeDecodeError) as e:
            return f"member {member}: not a readable image or caption ({e})"
        if not text:
            return f"member {key}.txt: empty caption"
        return image, text, key

    def num_samples(self, j: int) -> int:
        """The samples shard j holds (read from its tar headers): those before any damage."""
        return len(self._shard(j)[0].samples)

    def damage(self, j: int) -> str | None:
        """Why shard j's tar could not be read to its end, or None."""
        return self._shard(j)[0].truncated

    def image_bytes(self, j: int, n: int) -> tuple[bytes, str, str]:
        """(bytes, key, member name) of the image of sample n < num_samples(j) of shard j, undecoded and with
        or without a caption (what the feature cache hashes and encodes)."""
        index, f = self._shard(j)
        key, member, (offset, size), _ = index.samples[n]
        f.seek(offset)
        return f.read(size), key, member

    def close(self) -> None:
        for _, f in self.open.values():
            f.close()
        self.open.clear()


@dataclass(frozen=True)
class Plan:
    """What one rank reads in one epoch: from `start_step` on, `accum` micro-batches of `batch_size` per step."""

    first: int  # position of step 0 of this epoch
    steps: int
    start_step: int
    batch_size: int  # per rank
    accum: int
    rank: int
    world: int

    def positions(self, item: int) -> range:
        step, micro = divmod(item, self.accum)
        base = self.first + (self.start_step + step) * self.batch_size * self.world * self.accum
        start = base + (micro * self.world + self.rank) * self.batch_size
        return range(start, start + self.batch_size)

    @property
    def items(self) -> int:
        return (self.steps - self.start_step) * self.accum


class _MicroBatches(IterableDataset):
    """Micro-batches of one rank's plan: uint8 pixels (B, C, S, S), captions, keys, and the bad samples replaced."""

    def __init__(self, shards: "ShardedPairs", plan: Plan, side: int, in_chans: int) -> None:
        self.shards, self.plan, self.side, self.in_chans = shards, plan, side, in_chans

    def __iter__(self) -> Iterator[dict]:
        from encoders.pixels import square_pixels

        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        reader = self.shards.reader(keep=2 * self.shards.mix)
        spare: tuple[Tensor, str, str] | None = None
        try:
            for item in range(worker, self.plan.items, workers):
                good, bad = [], []
                for position in self.plan.positions(item):
                    j, n = self.shards.order.locate(position)
                    got = reader.read(j, n)
                    if isinstance(got, str):
                        bad.append(f"{self.shards.unit_name(j)}: {got}")
                        continue
                    try:
                        good.append((square_pixels(got[0], self.side, self.in_chans), got[1],
                                     f"{self.shards.units[j][0].name}/{got[2]}"))
                    except ValueError as e:
                        bad.append(f"{self.shards.unit_name(j)}: sample {n + 1}: {e}")
                if not good and spare is None:
                    raise DataError(f"every sample of a batch is unreadable: {bad[0]} ...")
                fill = spare or good[0]
                good += [fill] * len(bad)
                spare = good[0]
                yield {"item": item, "pixels": torch.stack([g[0] for g in good]), "captions": [g[1] for g in good],
                       "keys": [g[2] for g in good], "bad": bad}  # keys: shard/key, to trace a sample
        finally:
            reader.close()


class ShardedPairs:
    """A training set of tar shards (or Parquet row groups), read in a fixed order of sample positions (see the
    module docstring); `image_column`/`caption_column` name the Parquet columns."""

    def __init__(self, paths: Sequence[Path], seed: int, mix: int = 8, num_samples: int | None = None,
                 counts: Sequence[int] | None = None, image_column: str = "image",
                 caption_column: str = "caption") -> None:
        self.paths, self.mix = list(paths), max(1, mix)
        self.columns = (image_column, caption_column)
        self.parquet = self.paths[0].suffix == ".parquet"
        if self.parquet:  # each row group is a unit of the order, as a shard is (its rows: from the metadata)
            from .parquet import parquet_units

            self.units, self.counts = parquet_units(self.paths, image_column, caption_column)
        else:
            self.units = [(p, None) for p in self.paths]
            self.counts = list(counts) if counts is not None else shard_counts(self.paths)
        self.order = SampleOrder(self.counts, seed, self.mix)
        self.num_samples = num_samples or self.order.total  # open_clip's --train-num-samples: one epoch
        self.skipped = 0
        if self.num_samples > self.order.total:
            log.warning("--train-num-samples %d is more than the %d samples of the shards: an epoch repeats some",
                        self.num_samples, self.order.total)
        log.info("shards: %d with %d samples; an epoch is %d samples", len(self.paths), self.order.total,
                 self.num_samples)

    def __len__(self) -> int:
        return self.order.total

    def unit_name(self, j: int) -> str:
        """How warnings name unit j: the shard, or the Parquet file and row group."""
        path, group = self.units[j]
        return str(path) if group is None else f"{path} (row group {group})"

    def reader(self, keep: int):
        """A reader of (image, caption, key) by (unit, sample number), holding at most `keep` units open."""
        if self.parquet:
            from .parquet import ParquetReader

            return ParquetReader(self.units, *self.columns, keep=keep)
        return _ShardReader(self.paths, keep, self.counts)

    def steps_per_epoch(self, global_batch: int) -> int:
        return self.num_samples // global_batch

    def micro_batches(self, epoch: int, start_step: int, batch_size: int, accum: int, rank: int, world: int,
                      side: int, in_chans: int, workers: int = 0) -> Iterator[dict]:
        """This rank's micro-batches of `epoch` from step `start_step`, in order; bad samples are logged and counted."""
        global_batch = batch_size * accum * world
        steps = self.steps_per_epoch(global_batch)
        plan = Plan(epoch * steps * global_batch, steps, start_step, batch_size, accum, rank, world)
        dataset = _MicroBatches(self, plan, side, in_chans)
        # its own generator: the workers' seeds must not draw from the global RNG, or a resumed run's dropout
        # would differ from an uninterrupted one's (the global RNG is what checkpoints restore)
        loader = DataLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=2 if workers else None,
                            generator=torch.Generator().manual_seed(0))
        for batch in loader:
            for why in batch["bad"]:
                log.warning("skipped a bad sample: %s", why)
            self.skipped += len(batch["bad"])
            yield batch

    def sample_captions(self, limit: int) -> list[str]:
        """Up to `limit` captions, shard by shard in file order (the vocabulary of a word-level text tower)."""
        if self.parquet:
            from .parquet import parquet_captions

            return parquet_captions(self.paths, self.columns[1], limit)
        captions: list[str] = []
        reader = _ShardReader(self.paths, keep=1)
        try:
            for j in range(len(self.paths)):
                index, f = reader._shard(j)
                for _, _, _, caption in index.samples:
                    if caption is None:
                        continue
                    f.seek(caption[0])
                    captions.append(f.read(caption[1]).decode("utf-8", errors="replace").strip())
                    if len(captions) >= limit:
                        return captions
        finally:
            reader.close()
        return captions
