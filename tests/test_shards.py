"""WebDataset shards: `medvqa shards` writes what the caption source holds; `--train-data` streams it back,
split across ranks and workers without overlap, resumable mid-epoch, skipping bad samples with a warning."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
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


def test_a_dicom_pair_is_stored_as_the_png_it_decodes_to(tmp_path):
    from encoders import load_image
    from pretrain.data import CaptionPair
    from pretrain.shards import encode_image
    from tests.test_encoders_images import _dicom

    _, path = _dicom("CT_small.dcm")
    data, ext = encode_image(Path(path))
    assert ext == "png"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), np.asarray(load_image(path)))
    manifest = write_shards([CaptionPair(Path(path), "an axial CT slice")], tmp_path / "out", progress=False)
    assert manifest["total"]["samples"] == 1 and not manifest.get("skipped")


def test_an_existing_shard_folder_is_kept_unless_overwrite(phantom_dir, tmp_path):
    pairs = load_captions(phantom_dir / "captions", "train")
    write_shards(pairs[:4], tmp_path / "out", shard_size=2, progress=False)
    with pytest.raises(DataError, match="--overwrite"):
        write_shards(pairs[:2], tmp_path / "out", shard_size=2, progress=False)
    write_shards(pairs[:2], tmp_path / "out", shard_size=2, overwrite=True, progress=False)
    assert [p.name for p in sorted((tmp_path / "out").glob("*.tar"))] == ["000000.tar"]


# -- reading shards back ---------------------------------------------------------------------------------------
def _epoch_keys(shards, epoch: int, batch: int, world: int, workers: int, accum: int = 1, start_step: int = 0):
    """Per rank, the sample keys (shard/key) of every micro-batch of one epoch, in order."""
    return [[k for b in shards.micro_batches(epoch, start_step, batch, accum, rank, world, 32, 1, workers)
             for k in b["keys"]] for rank in range(world)]


def test_streamed_samples_are_the_source_pairs(phantom_dir, shard_dir):
    from pretrain.stream import ShardedPairs, expand_shards

    shards = ShardedPairs(expand_shards(shard_dir), seed=0, mix=2)
    assert len(shards) == 42
    captions = [c for b in shards.micro_batches(0, 0, 6, 1, 0, 1, 32, 1) for c in b["captions"]]
    assert sorted(captions) == sorted(p.caption for p in load_captions(phantom_dir / "captions", "train"))
    batch = next(shards.micro_batches(0, 0, 6, 1, 0, 1, 32, 1))
    assert tuple(batch["pixels"].shape) == (6, 1, 32, 32) and batch["bad"] == []


def test_two_ranks_by_two_workers_read_every_sample_once_per_epoch(shard_dir):
    from pretrain.stream import ShardedPairs, expand_shards

    shards = ShardedPairs(expand_shards(f"{shard_dir}/{{000000..000004}}.tar"), seed=3, mix=2)
    one = _epoch_keys(shards, 1, 6, 1, 0, accum=1)[0]  # 42 samples = 7 global batches of 6
    ranks = _epoch_keys(shards, 1, 3, 2, 2, accum=1)
    assert len(ranks[0]) == len(ranks[1]) == 21 and not set(ranks[0]) & set(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == sorted(one) and len(set(one)) == 42
    # the same global batches: step s of 2 ranks is step s of 1 process
    for s in range(7):
        assert sorted(ranks[0][3 * s:3 * s + 3] + ranks[1][3 * s:3 * s + 3]) == sorted(one[6 * s:6 * s + 6])
    assert _epoch_keys(shards, 2, 6, 1, 0)[0] != one  # each epoch its own order


def test_an_epoch_is_train_num_samples_and_resume_skips_exactly_the_seen_steps(shard_dir):
    from pretrain.stream import ShardedPairs, expand_shards

    shards = ShardedPairs(expand_shards(shard_dir), seed=0, mix=2, num_samples=24)
    assert shards.steps_per_epoch(8) == 3
    epochs = [_epoch_keys(shards, e, 8, 1, 2)[0] for e in range(2)]
    # positions 0-23, then 24-47: the first 18 of epoch 2 finish the pass (42 samples), then a new pass starts
    assert all(len(e) == 24 for e in epochs) and len(set(epochs[0]) | set(epochs[1][:18])) == 42
    full = _epoch_keys(shards, 1, 4, 2, 1)
    rest = _epoch_keys(shards, 1, 4, 2, 1, start_step=2)
    assert [r[8:] for r in full] == rest  # on each rank: the batches after step 2, and no others


def test_a_pattern_that_matches_nothing_is_an_error_before_any_work(shard_dir, tmp_path):
    from pretrain.stream import braceexpand, expand_shards

    assert braceexpand("a/{000008..000010}.tar") == ["a/000008.tar", "a/000009.tar", "a/000010.tar"]
    assert braceexpand("{x,y}-{1..2}") == ["x-1", "x-2", "y-1", "y-2"]
    with pytest.raises(DataError, match="matches no file"):
        expand_shards(f"{tmp_path}/{{000000..000009}}.tar")
    with pytest.raises(DataError, match="1 of its 6 shards do not exist.*000005.tar"):
        expand_shards(f"{shard_dir}/{{000000..000005}}.tar")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="without .tar shards"):
        expand_shards(tmp_path / "empty")


def _damaged_shards(shard_dir: Path, out: Path) -> Path:
    """A copy of the shards with a corrupt image in 000001, a caption removed in 000002, 000003 truncated."""
    import shutil

    shutil.copytree(shard_dir, out)
    for name, edit in (("000001.tar", "corrupt"), ("000002.tar", "uncaption")):
        members = _members(out / name)
        with tarfile.open(out / name, "w") as tar:
            for member, data in members.items():
                if edit == "corrupt" and member == "000000012.jpg":
                    data = data[:100]
                if edit == "uncaption" and member == "000000025.txt":
                    continue
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    data = (out / "000003.tar").read_bytes()
    (out / "000003.tar").write_bytes(data[:len(data) // 2])
    return out


def test_bad_members_and_truncated_shards_are_named_skipped_and_counted(phantom_dir, shard_dir, tmp_path, caplog):
    from pretrain.stream import ShardedPairs, expand_shards, index_shard

    damaged = _damaged_shards(shard_dir, tmp_path / "damaged")
    kept = len(index_shard(damaged / "000003.tar").samples)
    assert index_shard(damaged / "000003.tar").truncated and kept < 10
    shards = ShardedPairs(expand_shards(damaged), seed=0, mix=2)  # counts from the manifest: 42 slots
    with caplog.at_level(logging.WARNING):
        ranks = _epoch_keys(shards, 0, 3, 2, 2)
    bad = 1 + 1 + (10 - kept)
    assert shards.skipped == bad
    assert f"{damaged / '000001.tar'}: member 000000012.jpg" in caplog.text
    assert f"{damaged / '000002.tar'}: member 000000025.jpg: no caption" in caplog.text
    assert f"{damaged / '000003.tar'}: sample" in caplog.text
    # every batch keeps its size (gathered negatives), and no bad sample is trained on
    assert all(len(r) == 21 for r in ranks)
    distinct = set(ranks[0]) | set(ranks[1])
    assert len(distinct) == 42 - bad
    # and a training run over them goes on, counting what it skipped
    from pretrain import pretrain

    history = pretrain(_stream_cfg(phantom_dir, damaged, tmp_path / "run", epochs=1))["history"]
    assert history[0]["bad_samples"] == bad and math.isfinite(history[0]["loss"])


# -- pretraining on shards ------------------------------------------------------------------------------------
def _stream_cfg(phantom_dir, shard_dir, out, **kw):
    from pretrain import PretrainConfig

    base = dict(data=str(phantom_dir / "captions"), train_data=str(shard_dir), out=str(out), epochs=2,
                batch_size=6, lr=1e-3, warmup_epochs=0.5, progress=False, embed_dim=16, val_split="none",
                encoder="clip-vit-tiny", text="bert-tiny", shard_mix=2, seed=0)
    return PretrainConfig(**{**base, **kw})


def test_pretraining_streams_shards_and_resumes_mid_epoch_exactly(phantom_dir, shard_dir, tmp_path, monkeypatch):
    from pretrain import ContrastiveTask, pretrain

    full = pretrain(_stream_cfg(phantom_dir, shard_dir, tmp_path / "full", workers=2))["history"]
    assert len(full) == 2 and all(math.isfinite(r["loss"]) for r in full)

    calls = {"n": 0}
    step = ContrastiveTask.training_step

    def crash_after_4(self, *args):
        calls["n"] += 1
        if calls["n"] > 4:
            raise KeyboardInterrupt  # killed in epoch 1, after the checkpoint of step 3
        return step(self, *args)

    cfg = _stream_cfg(phantom_dir, shard_dir, tmp_path / "cut", workers=2, checkpoint_every=3)
    monkeypatch.setattr(ContrastiveTask, "training_step", crash_after_4)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg)
    monkeypatch.setattr(ContrastiveTask, "training_step", step)
    state = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert json.loads(state["partial"])["step"] == 3 and json.loads(state["task"])["samples_seen"] == 18

    seen = []
    stream = ContrastiveTask._steps

    def record(self, epoch, start_step):
        for item in stream(self, epoch, start_step):
            seen.append((epoch, start_step, [c for m in item for c in m.captions]))
            yield item

    monkeypatch.setattr(ContrastiveTask, "_steps", record)
    resumed = pretrain(replace(cfg, resume="latest"))["history"]
    assert seen[0][:2] == (0, 3) and len([s for s in seen if s[0] == 0]) == 7 - 3  # only the unseen steps
    assert len(full) == len(resumed) == 2  # both epochs, the resumed one's rows included
    for a, b in zip(full, resumed, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"],
                                                                                                   rel=1e-4)


@pytest.mark.slow
def test_two_processes_match_one_on_shards_and_resume_on_another_world_size(phantom_dir, shard_dir, tmp_path,
                                                                           monkeypatch):
    from pretrain import ContrastiveTask, pretrain

    from .conftest import spawn_ranks

    kw = dict(train_num_samples=12)  # 2 epochs of 2 steps
    one = pretrain(_stream_cfg(phantom_dir, shard_dir, tmp_path / "one", **kw))["history"]
    spawn_ranks(pretrain, _stream_cfg(phantom_dir, shard_dir, tmp_path / "two", batch_size=3, **kw))
    two = json.loads((tmp_path / "two" / "history.json").read_text())
    for a, b in zip(one, two, strict=True):  # the same global batches: the same loss and gradient
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)  # the logit scale's counted once

    step, calls = ContrastiveTask.training_step, {"n": 0}

    def crash_after_3(self, *args):
        calls["n"] += 1
        if calls["n"] > 3:  # in epoch 2, after the checkpoint of its step 1
            raise KeyboardInterrupt
        return step(self, *args)

    monkeypatch.setattr(ContrastiveTask, "training_step", crash_after_3)
    with pytest.raises(KeyboardInterrupt):
        pretrain(_stream_cfg(phantom_dir, shard_dir, tmp_path / "cut", checkpoint_every=1, **kw))
    monkeypatch.undo()
    spawn_ranks(pretrain, _stream_cfg(phantom_dir, shard_dir, tmp_path / "cut", batch_size=3, checkpoint_every=1,
                                      resume="latest", **kw))
    resumed = json.loads((tmp_path / "cut" / "history.json").read_text())
    for a, b in zip(one, resumed, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_a_frozen_text_tower_streams_and_bad_flags_are_clear_errors(phantom_dir, shard_dir, tmp_path, capsys):
    from pretrain import pretrain

    history = pretrain(_stream_cfg(phantom_dir, shard_dir, tmp_path / "frozen", epochs=1, freeze_text=True,
                                   train_num_samples=12))["history"]
    assert len(history) == 1 and math.isfinite(history[0]["loss"]) and history[0]["bad_samples"] == 0
    base = ["pretrain", "--data", str(phantom_dir / "captions"), "--out", str(tmp_path / "o"), "--no-progress",
            "--val-split", "none"]
    assert cli(base + ["--train-data", f"{tmp_path}/nothing/{{000000..000003}}.tar"]) == 2
    assert "matches no file" in capsys.readouterr().err and not (tmp_path / "o").exists()  # before any work
    assert cli(base + ["--train-data", str(shard_dir), "--train-num-samples", "10", "--batch-size", "16"]) == 2
    assert "fewer than one global batch" in capsys.readouterr().err
    assert cli(base + ["--train-data", str(shard_dir), "--shuffle-captions"]) == 2
    assert "--shuffle-captions" in capsys.readouterr().err
    from vqa.train import TrainConfig, train  # head training's batch order is not resumable within an epoch

    with pytest.raises(DataError, match="epoch ends only"):
        train(TrainConfig(data=str(phantom_dir / "vqa-rad"), encoder="clip-vit-tiny", out=str(tmp_path / "t"),
                          cache_dir=str(tmp_path / "cache"), checkpoint_every=5, progress=False, device="cpu"))


# -- Parquet (a `datasets` folder) streamed the same way ---------------------------------------------------------
@pytest.fixture(scope="module")
def parquet_dir(phantom_dir, tmp_path_factory) -> Path:
    """The phantom's training pairs as 2 Parquet files with row groups of 8, images as `datasets` writes them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pairs = load_captions(phantom_dir / "captions", "train")
    out = tmp_path_factory.mktemp("parquet") / "data"
    out.mkdir()
    for i, part in enumerate((pairs[:30], pairs[30:])):
        table = pa.table({"image": [{"bytes": Path(p.image).read_bytes(), "path": Path(p.image).name} for p in part],
                          "text": [p.caption for p in part]})
        pq.write_table(table, out / f"train-{i:05d}-of-00002.parquet", row_group_size=8)
    return out


def test_parquet_rows_stream_like_shards(phantom_dir, parquet_dir, tmp_path):
    from pretrain import pretrain
    from pretrain.stream import ShardedPairs, expand_shards

    with pytest.raises(DataError, match="no column 'caption'"):
        ShardedPairs(expand_shards(parquet_dir), seed=0)
    shards = ShardedPairs(expand_shards(parquet_dir), seed=0, mix=2, caption_column="text")
    assert len(shards) == 42 and len(shards.units) == 4 + 2  # row groups of 8: 30 -> 4, 12 -> 2
    ranks = _epoch_keys(shards, 0, 3, 2, 2)
    assert len(ranks[0]) == len(ranks[1]) == 21 and len(set(ranks[0]) | set(ranks[1])) == 42
    captions = [c for b in shards.micro_batches(0, 0, 6, 1, 0, 1, 32, 1) for c in b["captions"]]
    assert sorted(captions) == sorted(p.caption for p in load_captions(phantom_dir / "captions", "train"))
    history = pretrain(_stream_cfg(phantom_dir, parquet_dir, tmp_path / "run", epochs=1, caption_column="text",
                                   train_num_samples=12))["history"]
    assert math.isfinite(history[0]["loss"]) and history[0]["bad_samples"] == 0


def test_a_bad_parquet_row_is_named_and_skipped(phantom_dir, tmp_path, caplog):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pretrain.stream import ShardedPairs, expand_shards

    pairs = load_captions(phantom_dir / "captions", "train")[:4]
    images = [Path(p.image).read_bytes() for p in pairs]
    images[1] = images[1][:50]
    (tmp_path / "pq").mkdir()
    path = tmp_path / "pq" / "train.parquet"
    pq.write_table(pa.table({"image": images, "caption": [p.caption for p in pairs]}), path)
    shards = ShardedPairs(expand_shards(tmp_path / "pq"), seed=0)
    with caplog.at_level(logging.WARNING):
        batch = next(shards.micro_batches(0, 0, 4, 1, 0, 1, 32, 1))
    assert shards.skipped == 1 and len(batch["captions"]) == 4
    assert f"{path} (row group 0): row 1: 'image' is not a readable image" in caplog.text


def test_csv_and_datasets_sources_become_the_same_shards(phantom_dir, parquet_dir, tmp_path):
    import csv

    pairs = load_captions(phantom_dir / "captions", "train")
    with open(tmp_path / "pairs.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "text"])
        writer.writerows([str(p.image), p.caption] for p in pairs)
    assert cli(["shards", "--data", str(tmp_path / "pairs.csv"), "--image-column", "path", "--caption-column", "text",
                "--out", str(tmp_path / "csv"), "--shard-size", "16", "--no-progress"]) == 0
    source = sorted((Path(p.image).read_bytes(), p.caption) for p in pairs)
    assert sorted(_shard_samples(tmp_path / "csv").values()) == source
    # a Parquet `datasets` folder: its decoded images are written as PNG, pixel for pixel
    assert cli(["shards", "--data", str(parquet_dir), "--caption-format", "hf", "--caption-column", "text",
                "--out", str(tmp_path / "hf"), "--no-progress"]) == 0
    samples = _shard_samples(tmp_path / "hf")
    assert sorted(c for _, c in samples.values()) == sorted(p.caption for p in pairs)
    first = Image.open(io.BytesIO(samples["000000000"][0]))
    original = Image.open(pairs[0].image).convert(first.mode)
    assert first.format == "PNG" and np.array_equal(np.asarray(first), np.asarray(original))


def test_a_reader_holds_the_indexes_of_a_few_shards_not_of_the_corpus(shard_dir, monkeypatch):
    from pretrain import stream

    most = {"open": 0}
    shard = stream._ShardReader._shard

    def counting(self, j):
        out = shard(self, j)
        most["open"] = max(most["open"], len(self.open))
        return out

    monkeypatch.setattr(stream._ShardReader, "_shard", counting)
    shards = stream.ShardedPairs(stream.expand_shards(shard_dir), seed=0, mix=1)
    keys = _epoch_keys(shards, 0, 6, 1, 0)[0]
    assert len(set(keys)) == 42 and most["open"] == 2  # 2 x --shard-mix, of 5 shards


def test_accumulated_micro_batches_stream_the_same_global_batch(phantom_dir, shard_dir, tmp_path):
    from pretrain import pretrain

    kw = dict(epochs=1, train_num_samples=12)
    whole = pretrain(_stream_cfg(phantom_dir, shard_dir, tmp_path / "whole", **kw))["history"]
    accum = pretrain(_stream_cfg(phantom_dir, shard_dir, tmp_path / "accum", batch_size=3, accum_steps=2,
                                 **kw))["history"]
    assert whole[0]["loss"] == pytest.approx(accum[0]["loss"], rel=1e-5)
    assert whole[0]["grad_norm"] == pytest.approx(accum[0]["grad_norm"], rel=1e-4)


def test_webdataset_and_open_clip_read_our_shards(phantom_dir, shard_dir):
    wds = pytest.importorskip("webdataset")
    from pretrain.stream import braceexpand

    pattern = f"{shard_dir}/{{000000..000004}}.tar"
    import braceexpand as reference  # webdataset's dependency, which open_clip's --train-data goes through

    assert braceexpand(pattern) == list(reference.braceexpand(pattern))
    # the pipeline open_clip's get_wds_dataset builds: decode to PIL, image from jpg/png, caption from txt
    dataset = wds.WebDataset(pattern, shardshuffle=False).decode("pilrgb").to_tuple("jpg;png", "txt", "json")
    rows = list(dataset)
    pairs = load_captions(phantom_dir / "captions", "train")
    assert sorted(c for _, c, _ in rows) == sorted(p.caption for p in pairs)
    image, caption, meta = rows[0]
    assert image.size == Image.open(pairs[0].image).size and meta["caption"] == caption == pairs[0].caption


def test_shards_without_a_manifest_are_counted_from_their_headers(shard_dir, tmp_path, caplog):
    import shutil

    from pretrain.stream import ShardedPairs, expand_shards

    for shard in shard_dir.glob("*.tar"):  # as img2dataset leaves them: tars (and its own stats), no manifest.json
        shutil.copy(shard, tmp_path / shard.name)
    with caplog.at_level(logging.INFO):
        shards = ShardedPairs(expand_shards(f"{tmp_path}/*.tar"), seed=0)
    assert shards.counts == [10, 10, 10, 10, 2] and "from their tar headers" in caplog.text


def test_a_stale_manifest_that_undercounts_a_shard_is_a_warning(shard_dir, tmp_path, caplog):
    import shutil

    from pretrain.stream import ShardedPairs, expand_shards

    shutil.copytree(shard_dir, tmp_path / "s")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    manifest["shards"][0]["samples"] = 7
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    shards = ShardedPairs(expand_shards(tmp_path / "s"), seed=0, mix=1)
    with caplog.at_level(logging.WARNING):
        keys = _epoch_keys(shards, 0, 13, 1, 0)[0]
    assert len(keys) == 39 and "holds 10 samples, its manifest lists 7" in caplog.text
