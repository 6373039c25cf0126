"""`medvqa cache-features --train-data`: every image of tar shards into the feature cache, keyed as the source
files are, split across ranks and merged by rank 0, bad members skipped with a warning naming them."""
from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from encoders import FeatureCache, create_encoder, image_hash
from pretrain.data import load_captions
from pretrain.shard_features import ShardFeaturesConfig, cache_shard_features, shard_block
from pretrain.shards import write_shards
from vqa.cli import main as cli
from vqa.errors import DataError

from .conftest import spawn_ranks


@pytest.fixture(scope="module")
def corpus(phantom_dir, tmp_path_factory) -> tuple[Path, Path, list[Path]]:
    """(shard folder, saved encoder, source images): 12 phantom pairs in 3 shards of 4, a clip-vit-tiny saved
    once so that every process loads the same weights."""
    root = tmp_path_factory.mktemp("cache-shards")
    pairs = load_captions(phantom_dir / "captions", "train")[:12]
    write_shards(pairs, root / "shards", shard_size=4, progress=False)
    torch.manual_seed(0)
    create_encoder("clip-vit-tiny").save_pretrained(root / "encoder")
    return root / "shards", root / "encoder", [Path(p.image) for p in pairs]


def _cache_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_shard_blocks_cover_the_shards_once_in_order():
    for n, world in ((5, 2), (3, 4), (8, 3), (1, 1)):
        blocks = [shard_block(n, r, world) for r in range(world)]
        assert [j for b in blocks for j in b] == list(range(n))
        assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_shard_features_are_the_source_files_features_under_their_keys(corpus, tmp_path, capsys):
    shards, encoder_dir, sources = corpus
    cache_dir = tmp_path / "cache"
    assert cli(["cache-features", "--encoder", str(encoder_dir), "--train-data", f"{shards}/{{000000..000002}}.tar",
                "--cache-dir", str(cache_dir), "--batch-size", "5", "--device", "cpu", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == summary["added"] == summary["cached"] == 12 and summary["bad"] == 0
    folder = Path(summary["cache"])
    assert folder.parent == cache_dir and not list(folder.glob(".parts*"))  # the job's parts went with it

    encoder = create_encoder(str(encoder_dir)).freeze()
    direct = FeatureCache.open(tmp_path / "direct", encoder)
    hashes = direct.ensure(sources, batch_size=5, progress=False)
    from_shards = FeatureCache.open(folder, encoder)
    calls = []
    encoder.forward_features = lambda pixels, f=encoder.forward_features: calls.append(len(pixels)) or f(pixels)
    assert from_shards.ensure(sources, progress=False) == hashes and calls == []  # every source file is a hit
    for key, value in direct.lookup(hashes).items():
        assert torch.equal(from_shards.lookup(hashes)[key], value), key
    assert _cache_files(folder) == _cache_files(tmp_path / "direct")  # the same rows in the same order

    again = cache_shard_features(ShardFeaturesConfig(str(shards), str(encoder_dir), str(cache_dir), device="cpu",
                                                     progress=False))
    assert again["added"] == 0 and again["samples"] == 12 and again["cached"] == 12


def test_ranks_read_disjoint_blocks_that_together_are_every_sample(corpus, tmp_path):
    from pretrain.shard_features import _block_images
    from pretrain.stream import expand_shards

    shards, encoder_dir, sources = corpus
    paths = expand_shards(shards)
    empty = FeatureCache.open(tmp_path / "cache", create_encoder(str(encoder_dir)))
    per_rank = [[h for h, _ in _block_images(paths, shard_block(len(paths), r, 2), empty, {"samples": 0, "bad": 0},
                                             False)] for r in range(2)]
    assert [len(h) for h in per_rank] == [8, 4]  # shards 000000-000001, then 000002
    assert per_rank[0] + per_rank[1] == [image_hash(p) for p in sources]  # in order, each once


@pytest.mark.slow
def test_two_processes_write_the_cache_that_one_process_writes(corpus, tmp_path):
    shards, encoder_dir, _ = corpus
    one = cache_shard_features(ShardFeaturesConfig(str(shards), str(encoder_dir), str(tmp_path / "one"),
                                                   batch_size=3, device="cpu", progress=False))
    spawn_ranks(cache_shard_features, ShardFeaturesConfig(str(shards), str(encoder_dir), str(tmp_path / "two"),
                                                          batch_size=3, device="cpu", progress=False))
    folder_one = Path(one["cache"])
    folder_two = tmp_path / "two" / folder_one.name
    assert sorted(p.name for p in folder_two.iterdir()) == [".lock", "features.f16", "index.json", "keys.bin"]
    assert _cache_files(folder_two) == _cache_files(folder_one)


def test_a_job_leaves_the_parts_of_a_running_job_alone_and_sweeps_a_killed_ones(corpus, tmp_path):
    from encoders._files import OWNER_NAME, owned_dir
    from pretrain.shard_features import PARTS_PREFIX

    shards, encoder_dir, _ = corpus
    folder = tmp_path / "cache" / Path(cache_shard_features(ShardFeaturesConfig(
        str(shards), str(encoder_dir), str(tmp_path / "cache"), device="cpu", progress=False))["cache"]).name
    killed = folder / f"{PARTS_PREFIX}killed"  # its owner file is there, but nobody holds its lock
    (killed / "rank-00000").mkdir(parents=True)
    (killed / OWNER_NAME).touch()
    unowned = folder / f"{PARTS_PREFIX}noowner"
    unowned.mkdir()
    legacy = folder / ".parts" / "rank-00000"  # a killed run's, from before a folder per job
    legacy.mkdir(parents=True)
    with owned_dir(folder, PARTS_PREFIX) as running:  # another job, mid-way through its block
        (running / "rank-00000").mkdir()
        again = cache_shard_features(ShardFeaturesConfig(str(shards), str(encoder_dir), str(tmp_path / "cache"),
                                                         device="cpu", progress=False))
        assert again["cached"] == 12
        assert (running / "rank-00000").is_dir() and (running / OWNER_NAME).is_file()
        assert not killed.exists() and not unowned.exists() and not legacy.parent.exists()
    assert not running.exists() and not list(folder.glob(".parts*"))  # an owner removes its own on the way out


def _corrupt_member(shards: Path, out: Path, shard: str, member: str) -> Path:
    shutil.copytree(shards, out)
    with tarfile.open(out / shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    with tarfile.open(out / shard, "w") as tar:
        for name, data in members:
            data = data[:100] if name == member else data
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out


def test_a_corrupt_member_is_skipped_with_a_warning_naming_shard_and_member(corpus, tmp_path, caplog):
    shards, encoder_dir, _ = corpus
    with tarfile.open(shards / "000001.tar") as tar:
        member = next(m.name for m in tar if m.name.endswith((".png", ".jpg")))
    damaged = _corrupt_member(shards, tmp_path / "damaged", "000001.tar", member)
    with caplog.at_level(logging.WARNING):
        summary = cache_shard_features(ShardFeaturesConfig(str(damaged), str(encoder_dir), str(tmp_path / "cache"),
                                                           device="cpu", progress=False))
    assert summary["bad"] == 1 and summary["added"] == summary["cached"] == 11 and summary["samples"] == 12
    assert f"{damaged / '000001.tar'}: member {member}: not a readable image" in caplog.text


def test_a_truncated_shard_keeps_the_members_before_the_damage_with_a_warning(corpus, tmp_path, caplog):
    shards, encoder_dir, _ = corpus
    damaged = tmp_path / "damaged"
    shutil.copytree(shards, damaged)
    data = (damaged / "000002.tar").read_bytes()
    (damaged / "000002.tar").write_bytes(data[:len(data) // 2])
    with caplog.at_level(logging.WARNING):
        summary = cache_shard_features(ShardFeaturesConfig(str(damaged), str(encoder_dir), str(tmp_path / "cache"),
                                                           device="cpu", progress=False))
    assert 8 <= summary["added"] < 12 and summary["bad"] == 1
    assert f"{damaged / '000002.tar'}: member" in caplog.text and "not cached" in caplog.text


def test_a_pattern_matching_no_file_is_an_error_before_any_work(corpus, tmp_path, monkeypatch, capsys):
    import pretrain.shard_features as shard_features

    shards, encoder_dir, _ = corpus

    def no_work(*args, **kwargs):
        raise AssertionError("an encoder was built before the shards were checked")

    monkeypatch.setattr(shard_features, "create_encoder", no_work)
    with pytest.raises(DataError, match="matches no file"):
        cache_shard_features(ShardFeaturesConfig(f"{tmp_path}/{{000000..000003}}.tar", str(encoder_dir),
                                                 str(tmp_path / "cache")))
    assert not (tmp_path / "cache").exists()
    assert cli(["cache-features", "--encoder", str(encoder_dir), "--train-data", f"{tmp_path}/*.tar"]) != 0
    assert "matches no file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["cache-features", "--encoder", str(encoder_dir), "--train-data", str(shards), "--format", "vqa-rad"])
    assert "replaces --format/--data" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["cache-features", "--encoder", str(encoder_dir)])
    assert "--format and --data are required (or --train-data" in capsys.readouterr().err
