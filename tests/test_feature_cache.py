"""FeatureCache: hits, misses, growth, invalidation, content hashing, atomic files."""
from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from encoders import FeatureCache, create_encoder, image_hash
from vqa.errors import DataError


@pytest.fixture
def encoder():
    torch.manual_seed(0)
    return create_encoder("clip-vit-tiny").freeze()


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(5):
        path = tmp_path / "imgs" / f"img{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


class CountingEncoder:
    """Wraps an encoder's forward to count how many images it really encodes."""

    def __init__(self, encoder):
        self.count = 0
        original = encoder.forward_features

        def counted(pixels):
            self.count += pixels.shape[0]
            return original(pixels)

        encoder.forward_features = counted


def test_first_fill_then_all_hits(tmp_path, encoder, images):
    counter = CountingEncoder(encoder)
    cache = FeatureCache.open(tmp_path / "cache", encoder)
    hashes = cache.ensure(images[:3], batch_size=2, progress=False)
    assert counter.count == 3 and len(cache) == 3
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["features.f16", "index.json", "keys.bin"]
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert index["fingerprint"] == encoder.fingerprint() and index["grid"] == [16, 64]

    again = FeatureCache.open(tmp_path / "cache", encoder)
    assert again.ensure(images[:3], progress=False) == hashes
    assert counter.count == 3  # nothing recomputed


def test_lookup_matches_a_direct_forward(tmp_path, encoder, images):
    cache = FeatureCache.open(tmp_path / "cache", encoder)
    hashes = cache.ensure(images, batch_size=2, progress=False)
    feats = cache.lookup([hashes[3], hashes[0]])
    with torch.no_grad():
        direct = encoder(encoder.preprocess([images[3], images[0]]))
    assert feats["grid"].shape == (2, 16, 64) and feats["pooled"].shape == (2, 64)
    assert feats["grid"].dtype == torch.float32
    # float16 storage: relative error ~1e-3
    assert torch.allclose(feats["grid"], direct["grid"], atol=1e-2, rtol=1e-2)
    assert torch.allclose(feats["pooled"], direct["pooled"], atol=1e-2, rtol=1e-2)
    with pytest.raises(KeyError, match="ensure"):
        cache.lookup(["0" * 64])


def test_adding_images_computes_only_new_ones(tmp_path, encoder, images):
    cache = FeatureCache.open(tmp_path / "cache", encoder)
    first = cache.ensure(images[:2], progress=False)
    before = cache.lookup(first)
    counter = CountingEncoder(encoder)
    hashes = cache.ensure(images, batch_size=2, progress=False)
    assert counter.count == 3 and len(cache) == 5
    after = FeatureCache.open(tmp_path / "cache", encoder).lookup(first)  # old rows untouched
    assert torch.equal(before["grid"], after["grid"])
    assert hashes[:2] == first


def test_same_content_under_another_name_is_a_hit(tmp_path, encoder, images):
    cache = FeatureCache.open(tmp_path / "cache", encoder)
    cache.ensure(images[:1], progress=False)
    copy = tmp_path / "renamed_copy.png"
    shutil.copyfile(images[0], copy)
    counter = CountingEncoder(encoder)
    assert cache.ensure([copy], progress=False) == [image_hash(images[0])]
    assert counter.count == 0


def test_duplicates_in_one_request_are_computed_once(tmp_path, encoder, images):
    counter = CountingEncoder(encoder)
    cache = FeatureCache.open(tmp_path / "cache", encoder)
    hashes = cache.ensure([images[0], images[0], images[1]], progress=False)
    assert counter.count == 2 and hashes[0] == hashes[1]


def test_changed_weights_rebuild_the_cache(tmp_path, encoder, images, caplog):
    FeatureCache.open(tmp_path / "cache", encoder).ensure(images[:2], progress=False)
    with torch.no_grad():
        next(encoder.parameters()).view(-1)[0] += 0.5
    with caplog.at_level(logging.INFO, logger="encoders.cache"):
        cache = FeatureCache.open(tmp_path / "cache", encoder)
    assert len(cache) == 0 and "fingerprint changed" in caplog.text
    counter = CountingEncoder(encoder)
    cache.ensure(images[:2], progress=False)
    assert counter.count == 2


def test_other_encoder_gets_its_own_rebuild(tmp_path, encoder, images):
    FeatureCache.open(tmp_path / "cache", encoder).ensure(images[:1], progress=False)
    torch.manual_seed(0)
    other = create_encoder("mevf").freeze()
    cache = FeatureCache.open(tmp_path / "cache", other)
    hashes = cache.ensure(images[:1], progress=False)
    assert cache.grid_shape == (1, 128) and cache.lookup(hashes)["grid"].shape == (1, 1, 128)


def test_in_memory_images_hash_by_content():
    a = Image.new("RGB", (8, 8), (1, 2, 3))
    assert image_hash(a) == image_hash(a.copy()) == image_hash(np.asarray(a))
    assert image_hash(a) != image_hash(Image.new("RGB", (8, 8), (1, 2, 4)))
    assert image_hash(a) != image_hash(a.convert("L"))


def test_read_only_open_and_truncated_features(tmp_path, encoder, images):
    hashes = FeatureCache.open(tmp_path / "cache", encoder).ensure(images[:2], progress=False)
    reader = FeatureCache.open(tmp_path / "cache")  # no encoder: lookups only
    assert reader.lookup(hashes)["pooled"].shape == (2, 64)
    with pytest.raises(RuntimeError, match="without an encoder"):
        reader.ensure(images[2:3])
    with pytest.raises(FileNotFoundError):
        FeatureCache.open(tmp_path / "nothing")
    features = tmp_path / "cache" / "features.f16"
    features.write_bytes(features.read_bytes()[:10])  # damaged: the index needs more rows
    assert len(FeatureCache.open(tmp_path / "cache", encoder)) == 0


def test_cache_pickles_without_its_memmap(tmp_path, encoder, images):
    import pickle

    cache = FeatureCache.open(tmp_path / "cache", encoder)
    hashes = cache.ensure(images[:2], progress=False)
    cache.lookup(hashes)  # maps the file
    clone = pickle.loads(pickle.dumps(cache))
    assert torch.equal(clone.lookup(hashes)["grid"], cache.lookup(hashes)["grid"])


@pytest.mark.parametrize("damage", ["swap rows in index.json", "row out of range", "random bytes in features"])
def test_a_damaged_cache_is_rebuilt_never_served(tmp_path, encoder, images, damage, caplog):
    import numpy as np

    counter = CountingEncoder(encoder)
    cache = FeatureCache.open(tmp_path / "cache", encoder)
    hashes = cache.ensure(images[:3], progress=False)
    truth = cache.lookup(hashes)
    folder = tmp_path / "cache"
    index = json.loads((folder / "index.json").read_text())
    if damage == "swap rows in index.json":
        a, b = hashes[0], hashes[1]
        index["rows"][a], index["rows"][b] = index["rows"][b], index["rows"][a]
    elif damage == "row out of range":
        index["rows"][hashes[2]] = 99
    if damage.startswith("random"):
        size = (folder / "features.f16").stat().st_size
        (folder / "features.f16").write_bytes(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    else:
        (folder / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match="fail verification"):  # a reader never serves them
        FeatureCache.open(folder).lookup(hashes)
    with caplog.at_level(logging.WARNING, logger="encoders.cache"):
        again = FeatureCache.open(folder, encoder)
        assert again.ensure(images[:3], progress=False) == hashes
    assert "fail verification" in caplog.text and "rebuilding" in caplog.text
    assert counter.count == 6  # all three computed again
    features = again.lookup(hashes)
    for key in truth:
        assert torch.equal(features[key], truth[key]), key
