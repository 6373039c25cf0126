"""Which files a stream reads, and what it may not: a parquet folder's train split only, and VQA-RAD kept out only
by shards written without it."""
from __future__ import annotations

import json
import shutil

import pytest

from vqa.cli import main as cli
from vqa.errors import DataError

from .test_shards import _stream_cfg, parquet_dir, shard_dir  # noqa: F401 (fixtures)


def test_a_parquet_folder_streams_its_train_split_only(parquet_dir, tmp_path):
    from pretrain.stream import expand_shards

    hub = tmp_path / "hub"  # a hub snapshot: every split's files side by side
    shutil.copytree(parquet_dir, hub / "data")
    train = sorted((hub / "data").glob("train-*.parquet"))
    shutil.copy(train[0], hub / "data" / "test-00000-of-00001.parquet")
    (hub / "data" / "validation").mkdir()
    shutil.copy(train[1], hub / "data" / "validation" / "part-0.parquet")
    assert expand_shards(hub) == train
    shutil.copy(train[0], hub / "data" / "extra.parquet")  # named for no split, beside named ones: whose?
    with pytest.raises(DataError, match=r"1 .parquet file\(s\) named for no split .*extra.parquet"):
        expand_shards(hub)
    (hub / "data" / "extra.parquet").unlink()
    converted = tmp_path / "converted" / "default"  # the hub's refs/convert/parquet layout
    for split, f in (("partial-train", train[0]), ("test", train[1])):
        (converted / split).mkdir(parents=True)
        shutil.copy(f, converted / split / "0000.parquet")
    assert expand_shards(converted.parent) == [converted / "partial-train" / "0000.parquet"]
    for f in train:
        f.unlink()
    with pytest.raises(DataError, match=r"named for the splits \['test', 'validate'\], none for train"):
        expand_shards(hub)
    plain = tmp_path / "plain"  # files named for no split: all of them are the training data
    plain.mkdir()
    shutil.copy(parquet_dir / "train-00000-of-00002.parquet", plain / "part-0.parquet")
    assert expand_shards(plain) == [plain / "part-0.parquet"]


def test_excluding_vqa_rad_from_a_stream_needs_shards_written_without_it(phantom_dir, shard_dir, parquet_dir,
                                                                       tmp_path):
    """A stream cannot drop pairs as it reads them: --exclude-vqa-rad trusts only shards whose manifest says they
    were written without VQA-RAD's images, and refuses the rest before any training."""
    from pretrain import pretrain
    from pretrain.stream import check_vqa_rad_excluded, expand_shards

    with pytest.raises(DataError, match="manifest.json does not say its shards were written without VQA-RAD"):
        pretrain(_stream_cfg(phantom_dir, shard_dir, tmp_path / "a", exclude_vqa_rad=True))
    with pytest.raises(DataError, match="cannot drop rows of .parquet files as they stream"):
        pretrain(_stream_cfg(phantom_dir, parquet_dir, tmp_path / "b", exclude_vqa_rad=True, caption_column="text"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    clean, marked = tmp_path / "clean", shutil.copytree(phantom_dir / "captions", tmp_path / "marked")
    rows = [json.loads(line) for line in (marked / "train.jsonl").read_text().splitlines()]
    (marked / "train.jsonl").write_text("".join(json.dumps({**r, "also_in_vqa_rad": False}) + "\n" for r in rows))
    assert cli(["shards", "--data", str(marked), "--out", str(clean), "--exclude-vqa-rad", "--no-progress"]) == 0
    check_vqa_rad_excluded(expand_shards(clean), str(clean))  # written without them: accepted
    (clean / "manifest.json").unlink()
    with pytest.raises(DataError, match="has no manifest.json"):
        check_vqa_rad_excluded(expand_shards(clean), str(clean))
