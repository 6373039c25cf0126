"""WebDataset shards: `medvqa shards` writes what the caption source holds; `--train-data` streams it back,
split across ranks and workers without overlap, resumable mid-epoch, skipping bad samples with a warning."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from pretrain.data import load_captions
from pretrain.shards import write_shards
from vqa.cli import main as cli
from vqa.errors import DataError


def _members(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def _shard_samples(folder: Path) -> dict[str, tuple[bytes, str]]:
    """key -> (image bytes, caption) over every shard of `folder`."""
    out = {}
    for shard in sorted(folder.glob("*.tar")):
        members = _members(shard)
        for name, data in members.items():
            key, ext = name.split(".", 1)
            if ext in ("jpg", "png"):
                out[key] = (data, members[f"{key}.txt"].decode())
    return out


@pytest.fixture(scope="module")
def shard_dir(phantom_dir, tmp_path_factory) -> Path:
    """The phantom's 42 training pairs in shards of 10 (the last holds 2), written by 2 processes."""
    out = tmp_path_factory.mktemp("shards") / "train"
    assert cli(["shards", "--data", str(phantom_dir / "captions"), "--out", str(out), "--shard-size", "10",
                "--workers", "2", "--no-progress"]) == 0
    return out


def test_shards_hold_exactly_the_source_pairs(phantom_dir, shard_dir):
    pairs = load_captions(phantom_dir / "captions", "train")
    samples = _shard_samples(shard_dir)
    assert sorted(shard_dir.glob("*.tar")) == [shard_dir / f"{i:06d}.tar" for i in range((len(pairs) + 9) // 10)]
    source = sorted((Path(p.image).read_bytes(), p.caption) for p in pairs)
    assert sorted(samples.values()) == source  # the source files' own bytes, every caption, nothing twice
    first = _members(shard_dir / "000000.tar")
    meta = json.loads(first["000000000.json"])
    assert meta["caption"] == pairs[0].caption and meta["image"] == str(pairs[0].image)
    assert meta["labels"] == dict(pairs[0].labels)
    assert not [p for p in shard_dir.iterdir() if p.name.startswith(".")]  # no temp files left


def test_the_manifest_describes_every_shard(shard_dir):
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    assert manifest["total"]["shards"] == len(manifest["shards"]) == 5
    assert [s["samples"] for s in manifest["shards"]] == [10, 10, 10, 10, 2]
    assert manifest["total"]["samples"] == 42 and manifest["skipped"] == []
    for entry in manifest["shards"]:
        data = (shard_dir / entry["name"]).read_bytes()
        assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert manifest["source"]["split"] == "train" and manifest["source"]["pairs"] == 42


def test_unreadable_images_are_skipped_named_and_listed(phantom_dir, tmp_path, caplog):
    pairs = load_captions(phantom_dir / "captions", "train")[:6]
    broken = tmp_path / "broken.png"
    broken.write_bytes(Path(pairs[2].image).read_bytes()[:200])  # a truncated PNG
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image at all")
    from dataclasses import replace

    pairs[2], pairs[4] = replace(pairs[2], image=broken), replace(pairs[4], image=junk)
    with caplog.at_level(logging.WARNING):
        manifest = write_shards(pairs, tmp_path / "out", shard_size=4, progress=False)
    assert [s["samples"] for s in manifest["shards"]] == [3, 1]
    assert {s["image"] for s in manifest["skipped"]} == {str(broken), str(junk)}
    assert manifest["total"]["skipped"] == 2
    assert str(broken) in caplog.text and str(junk) in caplog.text
    assert set(_shard_samples(tmp_path / "out")) == {"000000000", "000000001", "000000003", "000000005"}


def test_in_memory_and_non_jpeg_images_become_png(tmp_path):
    from pretrain.data import CaptionPair

    image = Image.new("L", (16, 12), 128)
    manifest = write_shards([CaptionPair(image, "a gray square")], tmp_path / "out", progress=False)
    members = _members(tmp_path / "out" / "000000.tar")
    assert set(members) == {"000000000.png", "000000000.txt", "000000000.json"}
    assert Image.open(io.BytesIO(members["000000000.png"])).size == (16, 12)
    assert manifest["total"]["samples"] == 1


def test_an_existing_shard_folder_is_kept_unless_overwrite(phantom_dir, tmp_path):
    pairs = load_captions(phantom_dir / "captions", "train")
    write_shards(pairs[:4], tmp_path / "out", shard_size=2, progress=False)
    with pytest.raises(DataError, match="--overwrite"):
        write_shards(pairs[:2], tmp_path / "out", shard_size=2, progress=False)
    write_shards(pairs[:2], tmp_path / "out", shard_size=2, overwrite=True, progress=False)
    assert [p.name for p in sorted((tmp_path / "out").glob("*.tar"))] == ["000000.tar"]
