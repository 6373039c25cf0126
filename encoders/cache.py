"""The frozen-feature cache: run a frozen encoder once per image, then train heads
on stored features without touching pixels.

Folder layout:
    index.json    {"fingerprint", "encoder", "grid": [N, D], "row_size", "dtype": "float16",
                   "count", "rows": {image_hash: row}}
    features.f16  float16 rows of N*D grid values followed by the D pooled values
    keys.bin      per row, 36 bytes: the sha256 of the row's image and the crc32 of its features
    .lock         empty; the advisory lock a process holds while it rebuilds or appends

Every write goes to a temp name, then `os.replace`. Rows are only ever appended
(the grown file is a copy of the old rows plus the new ones), and the features
file is replaced before the index, so an interrupted write leaves a valid cache.
Every row is verified before it is served: its stored image hash must be the one
asked for and its checksum must match, so an edited index or damaged features are
found out; a cache that fails verification is rebuilt (with a warning), never trusted.
A changed encoder fingerprint (or grid shape) rebuilds the cache from scratch.
One writer at a time, enforced by the lock where the platform has `fcntl`: processes filling one
cache at once (seeds run side by side) take turns, and each sees the others' rows as hits. In
distributed runs still let rank 0 call `ensure`, then barrier (the other ranks would wait on the
lock anyway); or let each rank `add` to a part cache of its own and rank 0 `merge` the parts.
Lookups read only the rows asked for: features.f16 is a numpy.memmap, never loaded whole.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import logging
import os
import shutil
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from ._errors import DataError
from ._files import atomic_write, atomic_write_json, exclusive, sweep_stale_temps
from .base import ImageEncoder
from .images import ImageSource, load_image

logger = logging.getLogger(__name__)

INDEX_NAME = "index.json"
FEATURES_NAME = "features.f16"
KEYS_NAME = "keys.bin"
KEY_BYTES = 36  # sha256 digest (32) + crc32 (4, little-endian)
CACHE_FORMAT_VERSION = 2
_HASH_CHUNK = 1 << 20


def image_hash(src: ImageSource) -> str:
    """sha256 of the image's content: a file's bytes (so a renamed copy is a hit), or
    for in-memory images the mode, size and pixel bytes of the 8-bit image the encoder sees."""
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise FileNotFoundError(f"image file not found: {path}") from None
        # memoised on (path, mtime, size): re-hashing every file every epoch would dominate head training
        return _file_sha256(str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    img = load_image(src)  # as the encoder sees it: two EXIF orientations of one picture are two images
    h = hashlib.sha256(f"{img.mode}|{img.size[0]}x{img.size[1]}|".encode())
    h.update(img.tobytes())
    return h.hexdigest()


def bytes_hash(data: bytes) -> str:
    """`image_hash` of a file holding `data` (a shard member written from that file's own bytes)."""
    return hashlib.sha256(data).hexdigest()


@functools.lru_cache(maxsize=1 << 18)
def _file_sha256(path: str, mtime_ns: int, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


class FeatureCache:
    """Features of one encoder for many images, in a float16 memory map.

        cache = FeatureCache.open("runs/cache/clip", encoder)
        hashes = cache.ensure(image_paths, batch_size=64, device="cuda")
        feats = cache.lookup(hashes[:8])  # {"grid": (8, N, D), "pooled": (8, D)}, float32
    """

    def __init__(self, folder: Path, index: dict[str, Any], encoder: ImageEncoder | None):
        self.folder = folder
        self.encoder = encoder
        self._index = index
        self._rows: dict[str, int] = index["rows"]
        self._memmap: np.memmap | None = None
        self._writing_depth = 0  # > 0 while this object holds the folder's lock

    # -- opening -------------------------------------------------------------------
    @classmethod
    def open(cls, folder: str | os.PathLike, encoder: ImageEncoder | None = None) -> "FeatureCache":
        """Open (or create) the cache for `encoder`; without an encoder, open an existing
        cache read-only (lookups only)."""
        folder = Path(folder)
        if encoder is None:
            index = _read_index(folder)
            if index is None:
                raise FileNotFoundError(f"no feature cache in {folder} (missing {INDEX_NAME})")
            return cls(folder, index, None)
        expected = _empty_index(encoder)
        with exclusive(folder) as locked:  # another process may be deciding the same, or writing rows
            if locked:  # every writer writes under this lock: the temp files here are a dead one's
                sweep_stale_temps(folder, any_age=True)
            index = _read_index(folder)
            reason = _rebuild_reason(folder, index, expected)
            if reason:
                logger.info("feature cache %s: rebuilding from scratch (%s)", folder, reason)
                atomic_write_json(folder / INDEX_NAME, expected, indent=None)  # index first: old rows never read
                for name in (FEATURES_NAME, KEYS_NAME):
                    (folder / name).unlink(missing_ok=True)
                index = expected
            else:
                logger.info("feature cache %s: %d images cached for %s", folder, index["count"], encoder.name)
        return cls(folder, index, encoder)

    # -- reading -------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        return self._index["fingerprint"]

    @property
    def grid_shape(self) -> tuple[int, int]:
        n, d = self._index["grid"]
        return int(n), int(d)

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, image_hash_: str) -> bool:
        return image_hash_ in self._rows

    def lookup(self, hashes: Sequence[str]) -> dict[str, Tensor]:
        """Features of images by hash: {"grid": (B, N, D), "pooled": (B, D)} float32, every row verified."""
        missing = [h for h in hashes if h not in self._rows]
        if missing:
            raise KeyError(f"{len(missing)} image(s) not in feature cache {self.folder} "
                           f"(first: {missing[0]}); call ensure() first")
        bad = self.unverified(hashes)
        if bad:
            raise DataError(f"feature cache {self.folder}: {len(bad)} row(s) fail verification (first: image "
                            f"{bad[0][:12]}): edited or damaged; open it with the encoder to rebuild it")
        n, d = self.grid_shape
        rows = np.fromiter((self._rows[h] for h in hashes), dtype=np.int64, count=len(hashes))
        block = np.asarray(self._features()[rows], dtype=np.float32)  # (B, N*D + D)
        data = torch.from_numpy(block)
        return {"grid": data[:, : n * d].reshape(-1, n, d), "pooled": data[:, n * d:]}

    def unverified(self, hashes: Sequence[str]) -> list[str]:
        """The cached `hashes` whose row is out of range, holds another image's key, or fails its checksum."""
        count = self._index["count"]
        if not count:
            return [h for h in hashes if h in self._rows]
        keys, features = self._keys(), self._features()
        bad = []
        for h in dict.fromkeys(hashes):
            row = self._rows.get(h)
            if row is None:
                continue
            if not (isinstance(row, int) and 0 <= row < count) or keys is None:
                bad.append(h)
                continue
            key = keys[row].tobytes()
            crc = int.from_bytes(key[32:], "little")
            if key[:32] != bytes.fromhex(h) or zlib.crc32(features[row].tobytes()) != crc:
                bad.append(h)
        return bad

    def _keys(self) -> np.ndarray | None:
        path = self.folder / KEYS_NAME
        if not path.is_file() or path.stat().st_size < self._index["count"] * KEY_BYTES:
            return None
        return np.memmap(path, dtype=np.uint8, mode="r", shape=(self._index["count"], KEY_BYTES))

    def _features(self) -> np.memmap:
        if self._memmap is None:
            count = self._index["count"]
            if count == 0:
                return np.zeros((0, self._index["row_size"]), dtype=np.float16)  # type: ignore[return-value]
            self._check_owner(_index_header(self.folder))
            self._memmap = np.memmap(self.folder / FEATURES_NAME, dtype=np.float16, mode="r",
                                     shape=(count, self._index["row_size"]))
        return self._memmap

    def _reset(self) -> None:
        """Forget every row (the next write starts the files afresh)."""
        assert self.encoder is not None
        self._index = _empty_index(self.encoder, self._index["fingerprint"])
        self._rows = self._index["rows"]
        self._memmap = None
        atomic_write_json(self.folder / INDEX_NAME, self._index, indent=None)
        for name in (FEATURES_NAME, KEYS_NAME):
            (self.folder / name).unlink(missing_ok=True)

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers (spawn) need lookups only: don't ship the mapped array or
        # the encoder's weights; a pickled copy is read-only.
        state = self.__dict__.copy()
        state["_memmap"] = None
        state["encoder"] = None
        state["_writing_depth"] = 0
        return state

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Hold the folder's lock and read the index again first: rows another process added since this cache
        was opened are hits, never encoded twice or overwritten. Re-entrant within this object."""
        if self._writing_depth:
            self._writing_depth += 1
            try:
                yield
            finally:
                self._writing_depth -= 1
            return
        with exclusive(self.folder):
            self._writing_depth = 1
            try:
                index = _read_index(self.folder)
                if index is not None:
                    self._check_owner(index)
                    self._index, self._rows, self._memmap = index, index["rows"], None
                yield
            finally:
                self._writing_depth = 0

    def _check_owner(self, index: dict | None) -> None:
        """Refuse a folder that another process has rebuilt for another encoder since this cache opened it: its
        rows would pass verification (they are consistent, only someone else's) and be read as this encoder's."""
        if index is not None and (index.get("fingerprint"), index.get("row_size")) != (
                self._index["fingerprint"], self._index["row_size"]):
            raise DataError(f"feature cache {self.folder}: rebuilt for another encoder (fingerprint "
                            f"{index.get('fingerprint')}) while this one ({self._index['fingerprint']}) had it open; "
                            "give each encoder its own folder (as `vqa.features` names them)")

    # -- writing -------------------------------------------------------------------
    def ensure(self, images: Iterable[ImageSource], batch_size: int = 32, device: str | torch.device | None = None,
               progress: bool = True) -> list[str]:
        """Compute features for the images not cached yet; return every image's hash (in order).

        Runs the encoder in eval mode under no_grad on `device` (default: where its
        weights are; the encoder stays there) and commits all new rows at the end."""
        if self.encoder is None:
            raise RuntimeError(f"feature cache {self.folder} was opened without an encoder; cannot compute")
        images = list(images)
        hashes = [image_hash(img) for img in images]
        with self._writing():
            bad = self.unverified(hashes)
            if bad:
                logger.warning("feature cache %s: %d cached row(s) fail verification (first: image %s; the index "
                               "was edited or the features damaged): rebuilding the cache", self.folder, len(bad),
                               bad[0][:12])
                self._reset()
            todo: dict[str, ImageSource] = {}
            for h, img in zip(hashes, images):
                if h not in self._rows and h not in todo:
                    todo[h] = img
            logger.info("feature cache %s: %d hits, %d to compute (%d images asked)",
                        self.folder, len(images) - sum(h in todo for h in hashes), len(todo), len(images))
            if todo:
                self.add(todo.items(), batch_size, device, progress, total=len(todo))
        return hashes

    def add(self, items: Iterable[tuple[str, ImageSource]], batch_size: int = 32,
            device: str | torch.device | None = None, progress: bool = True, total: int | None = None,
            desc: str | None = None) -> int:
        """Encode images under the hashes given with them and append them; returns how many rows were added.

        For images whose hash the caller knows without a file to hash (a tar shard's member: the sha256 of
        its bytes is `image_hash` of the file it was written from). Hashes already cached or repeated are
        skipped; one batch of images is in memory at a time; all new rows are committed at the end."""
        if self.encoder is None:
            raise RuntimeError(f"feature cache {self.folder} was opened without an encoder; cannot compute")
        encoder = self.encoder
        device = torch.device(device) if device is not None else next(encoder.parameters()).device
        was_training = encoder.training
        encoder.to(device).eval()  # frozen features: BatchNorm statistics, no dropout
        bar = _progress(total, desc or f"caching {encoder.name} features", progress)
        try:
            with self._writing():
                added = self._append(self._encoded(items, batch_size, device, bar))
        finally:
            bar.close()
            encoder.train(was_training)
        if added:
            logger.info("feature cache %s: added %d images (now %d)", self.folder, added, self._index["count"])
        return added

    def _encoded(self, items: Iterable[tuple[str, ImageSource]], batch_size: int, device: torch.device,
                 bar) -> Iterator[tuple[list[str], np.ndarray]]:
        """(hashes, rows (B, N*D + D) float16) for the items not cached yet, `batch_size` images at a time."""
        assert self.encoder is not None
        seen = set(self._rows)
        batch: list[tuple[str, ImageSource]] = []
        consumed = 0
        for h, img in items:
            consumed += 1
            if h in seen:
                continue
            seen.add(h)
            batch.append((h, img))
            if len(batch) == batch_size:
                yield self._encode_batch(batch, device)
                bar.update(consumed)
                batch, consumed = [], 0
        if batch:
            yield self._encode_batch(batch, device)
        bar.update(consumed)

    def _encode_batch(self, batch: list[tuple[str, ImageSource]], device: torch.device):
        feats = self.encoder.encode([img for _, img in batch], device)  # type: ignore[union-attr]
        return [h for h, _ in batch], torch.cat([feats["grid"].flatten(1), feats["pooled"]], dim=1).numpy()

    def _append(self, chunks: Iterable[tuple[list[str], np.ndarray]]) -> int:
        """Write the old rows and then every chunk's to temp files, rename them, then the index."""
        chunks = iter(chunks)
        first = next(chunks, None)
        if first is None:
            return 0  # nothing new: the files stay untouched
        row_size, count = self._index["row_size"], self._index["count"]
        features, keys = self.folder / FEATURES_NAME, self.folder / KEYS_NAME
        added: list[str] = []
        with atomic_write(features, binary=True) as out, atomic_write(keys, binary=True) as key_out:
            for path, sink, size in ((features, out, row_size * 2), (keys, key_out, KEY_BYTES)):
                if count and path.exists():
                    with open(path, "rb") as old:  # keep old rows in place: existing indices stay valid
                        shutil.copyfileobj(old, sink)
                sink.truncate(count * size)  # drop any unindexed tail
                sink.seek(0, os.SEEK_END)
            for hashes, rows in itertools.chain([first], chunks):
                rows = np.ascontiguousarray(rows, dtype=np.float16)
                if rows.shape != (len(hashes), row_size):
                    raise DataError(f"feature cache {self.folder}: {len(hashes)} rows of shape {rows.shape[1:]} "
                                    f"given, expected rows of {row_size} values")
                out.write(rows.tobytes())
                key_out.write(b"".join(bytes.fromhex(h) + zlib.crc32(row.tobytes()).to_bytes(4, "little")
                                       for h, row in zip(hashes, rows)))
                added += hashes
        rows = dict(self._rows)
        rows.update((h, count + offset) for offset, h in enumerate(added))
        index = {**self._index, "rows": rows, "count": count + len(added)}
        atomic_write_json(self.folder / INDEX_NAME, index, indent=None)
        self._index, self._rows = index, rows  # only once on disk: a failed write leaves this object as it was
        self._memmap = None  # remap at the new size on next lookup
        return len(added)

    def merge(self, parts: Sequence[str | os.PathLike], chunk_rows: int = 1024) -> int:
        """Append the rows of other caches of the same encoder (the parts that ranks wrote) that this one lacks,
        in the order of `parts` and of their rows; returns how many were added.

        Every row is verified as `lookup` verifies it (its stored image hash and checksum) before it is
        copied, `chunk_rows` rows at a time (a part is never read whole into memory). Written like every
        append, temp files then rename: a merge that fails or is killed leaves this cache as it was. A part of
        another encoder, or a row failing verification, is a DataError naming the part and the image."""
        opened = [FeatureCache.open(part) for part in parts]
        for part in opened:
            if part.fingerprint != self.fingerprint or part.grid_shape != self.grid_shape:
                raise DataError(f"{part.folder}: features of encoder {part._index.get('encoder')} (fingerprint "
                                f"{part.fingerprint[:12]}, grid {list(part.grid_shape)}), not of this cache's "
                                f"{self._index['encoder']} ({self.fingerprint[:12]}, grid {list(self.grid_shape)}); "
                                "every rank must load the same encoder weights")
        with self._writing():
            added = self._append(self._part_rows(opened, chunk_rows))
        logger.info("feature cache %s: merged %d part(s), %d new images (now %d)", self.folder, len(opened), added,
                    self._index["count"])
        return added

    def _part_rows(self, parts: Sequence["FeatureCache"], chunk_rows: int) -> Iterator[tuple[list[str], np.ndarray]]:
        seen = set(self._rows)
        for part in parts:
            order = sorted(part._rows, key=part._rows.__getitem__)  # row order: the order the part was written in
            for start in range(0, len(order), chunk_rows):
                hashes = [h for h in order[start:start + chunk_rows] if h not in seen]
                if not hashes:
                    continue
                bad = part.unverified(hashes)
                if bad:
                    raise DataError(f"{part.folder}: row {part._rows[bad[0]]} (image {bad[0][:12]}) fails "
                                    f"verification ({len(bad)} such row(s)): the part is damaged; encode it again")
                seen.update(hashes)
                yield hashes, part._features()[np.array([part._rows[h] for h in hashes], dtype=np.int64)]


def _empty_index(encoder: ImageEncoder, fingerprint: str | None = None) -> dict[str, Any]:
    n, d = encoder.num_patches, encoder.feature_dim
    return {"format_version": CACHE_FORMAT_VERSION, "fingerprint": fingerprint or encoder.fingerprint(),
            "encoder": encoder.name,
            "grid": [n, d], "grid_size": list(encoder.grid_size), "row_size": n * d + d, "dtype": "float16",
            "count": 0, "rows": {}}


def _rebuild_reason(folder: Path, index: dict[str, Any] | None, expected: dict[str, Any]) -> str | None:
    if index is None:
        return "no index yet"
    if index.get("format_version") != CACHE_FORMAT_VERSION:
        return f"format version {index.get('format_version')} != {CACHE_FORMAT_VERSION}"
    if index.get("fingerprint") != expected["fingerprint"]:
        return f"encoder fingerprint changed ({str(index.get('fingerprint'))[:12]} -> {expected['fingerprint'][:12]})"
    if index.get("grid") != expected["grid"] or index.get("row_size") != expected["row_size"]:
        return f"grid shape changed ({index.get('grid')} -> {expected['grid']})"
    needed = index["count"] * index["row_size"] * 2
    path = folder / FEATURES_NAME
    have = path.stat().st_size if path.exists() else 0
    if have < needed:
        return f"{FEATURES_NAME} holds {have} bytes, the index needs {needed}"
    return None


def _read_index(folder: Path) -> dict[str, Any] | None:
    path = folder / INDEX_NAME
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):  # damaged: the cache is rebuilt
        logger.warning("feature cache %s: unreadable %s", folder, INDEX_NAME)
        return None
    return index if isinstance(index, dict) and "rows" in index and "count" in index else None


def _index_header(folder: Path) -> dict[str, Any] | None:
    """The index's settings without its rows (written first, `_empty_index`): a check of whose rows the files hold
    costs a few hundred bytes, not a parse of every row; the whole index where the header is not found."""
    path = folder / INDEX_NAME
    try:
        with open(path, encoding="utf-8") as f:
            head = f.read(4096)
        return json.loads(head[:head.index(', "rows":')] + "}")
    except FileNotFoundError:
        return None
    except ValueError:  # no header in the first 4 kB (not written by `_empty_index`'s order), or not JSON
        return _read_index(folder)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="img")
