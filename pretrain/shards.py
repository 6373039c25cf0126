"""Write caption pairs as WebDataset tar shards (`medvqa shards`), the layout open_clip and img2dataset use.

    summary = write_shards(load_captions("runs/phantom/captions", "train"), "runs/shards", shard_size=1000)

OUT/000000.tar, 000001.tar, ... hold, per sample, `<key>.jpg` or `<key>.png` (the source file's
own bytes when it is a JPEG or PNG, else a lossless PNG), `<key>.txt` (the caption, UTF-8) and
`<key>.json` (key, caption, source id, the original image name, labels). The key is the pair's
position in the source, zero-padded to 9 digits, so shard i holds pairs [i*S, (i+1)*S) minus
the bad ones. OUT/manifest.json: per shard its name, sample count, bytes and sha256; the totals;
the source; every image that could not be read (name and reason), never skipped silently.

Every image is decoded once while writing (a truncated JPEG fails here, not in the 40th hour of
training). Shards are written by `workers` processes, each to a temp name then renamed, so a
reader never sees half a shard; the manifest is written last, also atomically.
"""
from __future__ import annotations

import hashlib
import io
import logging
import tarfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from PIL import Image

from vqa.errors import DataError
from vqa.io import atomic_write, atomic_write_json

from .data import CaptionPair

log = logging.getLogger(__name__)
MANIFEST_NAME = "manifest.json"
SHARD_DIGITS = 6
KEY_DIGITS = 9
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # what a reader accepts as a sample's image member
_KEEP_BYTES = {"JPEG": "jpg", "PNG": "png"}  # formats stored as the source's own bytes


@dataclass(frozen=True)
class _Job:
    index: int  # shard number
    out: str
    start: int  # key of the first pair
    pairs: Sequence[CaptionPair]


def shard_name(index: int) -> str:
    return f"{index:0{SHARD_DIGITS}d}.tar"


def image_name(image: Any) -> str:
    """How a pair's image is named in warnings and the manifest: its path, or `<in-memory image>`."""
    return str(image) if not isinstance(image, Image.Image) else "<in-memory image>"


def encode_image(image: Path | Image.Image) -> tuple[bytes, str]:
    """(bytes, extension) of one image as a shard stores it; ValueError/FileNotFoundError naming the file."""
    from encoders.images import is_dicom, load_image

    decoded = load_image(image)  # the full decode: a corrupt or truncated file raises here
    if not isinstance(image, Image.Image) and not is_dicom(Path(image)):  # PIL cannot open a DICOM to ask its format
        with Image.open(image) as img:
            ext = _KEEP_BYTES.get(img.format or "")
        if ext:
            return Path(image).read_bytes(), ext
    buf = io.BytesIO()
    decoded.save(buf, format="PNG")  # DICOM, 16-bit, TIFF, in-memory: lossless and readable by every loader
    return buf.getvalue(), "png"


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # mtime 0: the same pairs give the same bytes
    tar.addfile(info, io.BytesIO(data))


def _sample_json(key: str, pair: CaptionPair) -> bytes:
    import json

    meta = {"key": key, "caption": pair.caption, "source_id": pair.source_id, "image": image_name(pair.image),
            "labels": dict(pair.labels)}
    return json.dumps(meta, ensure_ascii=False).encode("utf-8")


def _write_shard(job: _Job) -> dict:
    """Write one shard (temp name, then rename); returns its manifest entry and the images it skipped."""
    path = Path(job.out) / shard_name(job.index)
    bad, count = [], 0
    with atomic_write(path, binary=True) as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for offset, pair in enumerate(job.pairs):
                key = f"{job.start + offset:0{KEY_DIGITS}d}"
                try:
                    data, ext = encode_image(pair.image)
                except (ValueError, FileNotFoundError, OSError) as e:
                    bad.append({"key": key, "image": image_name(pair.image), "error": str(e)})
                    continue
                _member(tar, f"{key}.{ext}", data)
                _member(tar, f"{key}.txt", pair.caption.encode("utf-8"))
                _member(tar, f"{key}.json", _sample_json(key, pair))
                count += 1
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return {"shard": {"name": path.name, "samples": count, "bytes": size, "sha256": digest.hexdigest()},
            "bad": bad}


def _run(jobs: list[_Job], workers: int, progress: bool) -> Iterable[dict]:
    from tqdm import tqdm

    bar = tqdm(total=sum(len(j.pairs) for j in jobs), desc="shards", unit="img", disable=not progress)
    if workers <= 1:
        results = map(_write_shard, jobs)
        pool = None
    else:
        pool = ProcessPoolExecutor(max_workers=workers)
        results = pool.map(_write_shard, jobs)  # in shard order, whichever finishes first
    try:
        for job, result in zip(jobs, results):
            bar.update(len(job.pairs))
            yield result
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        bar.close()


def write_shards(pairs: Sequence[CaptionPair], out: str | Path, shard_size: int = 1000, workers: int = 0,
                 source: dict | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    """Write `pairs` as tar shards of `shard_size` pairs into `out`; returns the manifest (also OUT/manifest.json).

    Unreadable images are skipped, counted, logged and listed in the manifest under `skipped`."""
    if shard_size < 1:
        raise DataError(f"--shard-size must be at least 1, got {shard_size}")
    if not pairs:
        raise DataError("no image-caption pairs to write")
    out = Path(out)
    existing = sorted(out.glob("*.tar")) if out.is_dir() else []
    if existing and not overwrite:
        raise DataError(f"{out}: already holds {len(existing)} shard(s) (e.g. {existing[0].name}); "
                        "pass --overwrite or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    for stale in existing + ([out / MANIFEST_NAME] if (out / MANIFEST_NAME).exists() else []):
        stale.unlink()  # a shorter rewrite must not leave shards of the old corpus behind
    jobs = [_Job(i, str(out), start, pairs[start:start + shard_size])
            for i, start in enumerate(range(0, len(pairs), shard_size))]
    shards, skipped = [], []
    for result in _run(jobs, workers, progress):
        shards.append(result["shard"])
        for bad in result["bad"]:
            log.warning("skipped %s (key %s): %s", bad["image"], bad["key"], bad["error"])
        skipped += result["bad"]
    manifest = {"format": "webdataset", "shard_size": shard_size, "shards": shards,
                "total": {"shards": len(shards), "samples": sum(s["samples"] for s in shards),
                          "bytes": sum(s["bytes"] for s in shards), "skipped": len(skipped)},
                "source": source or {}, "skipped": skipped}
    atomic_write_json(out / MANIFEST_NAME, manifest)
    if skipped:
        log.warning("%s: skipped %d unreadable image(s); they are listed in %s", out, len(skipped),
                    out / MANIFEST_NAME)
    log.info("wrote %d samples in %d shard(s) to %s", manifest["total"]["samples"], len(shards), out)
    return manifest
