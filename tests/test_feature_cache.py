"""FeatureCache: hits, misses, growth, invalidation, content hashing, atomic files."""
from __future__ import annotations

import copy
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
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [".lock", "features.f16", "index.json", "keys.bin"]
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


def test_a_folder_rebuilt_for_another_encoder_under_an_open_cache_is_refused(tmp_path, encoder, images):
    """Two processes, one folder, two encoders: the second rebuilds it for its own features, whose rows (the same
    images, in the same order) are consistent and pass verification; the first must not read them as its own."""
    first = FeatureCache.open(tmp_path / "cache", encoder)
    hashes = first.ensure(images[:2], progress=False)
    reader = FeatureCache.open(tmp_path / "cache", encoder)  # opened, not yet read
    changed = copy.deepcopy(encoder)
    with torch.no_grad():
        next(changed.parameters()).view(-1)[0] += 0.5
    FeatureCache.open(tmp_path / "cache", changed).ensure(images[:2], progress=False)
    with pytest.raises(DataError, match="rebuilt for another encoder"):
        reader.lookup(hashes)
    with pytest.raises(DataError, match="rebuilt for another encoder"):
        first.ensure(images[:3], progress=False)


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


# -- parts written apart (one per rank) and merged; lookups read only the rows asked for ----------------------
def _part(folder, encoder, images):
    """A part cache holding `images` under their files' hashes, encoded from their bytes as a shard holds them."""
    from encoders import bytes_hash
    from encoders.images import decode_image

    part = FeatureCache.open(folder, encoder)
    items = [(bytes_hash(p.read_bytes()), decode_image(p.read_bytes(), str(p))) for p in images]
    part.add(items, batch_size=2, progress=False)
    return folder


def test_images_decoded_from_bytes_give_the_features_of_their_files(tmp_path, encoder, images):
    from encoders.images import decode_image

    jpeg = tmp_path / "photo.jpg"
    Image.open(images[0]).save(jpeg, quality=90)
    files = [images[1], jpeg]
    direct = encoder.encode(files)
    decoded = encoder.encode([decode_image(p.read_bytes(), str(p)) for p in files])
    for key in direct:
        assert torch.equal(direct[key], decoded[key]), key
    with pytest.raises(ValueError, match="member.png: not a readable image"):
        decode_image(b"not an image", "shard.tar/member.png")


def test_merged_parts_equal_a_cache_filled_directly(tmp_path, encoder, images):
    direct = FeatureCache.open(tmp_path / "direct", encoder)
    hashes = direct.ensure(images, batch_size=2, progress=False)
    merged = FeatureCache.open(tmp_path / "merged", encoder)
    merged.ensure(images[:1], progress=False)
    parts = [_part(tmp_path / "part0", encoder, images[:3]), _part(tmp_path / "part1", encoder, images[2:])]
    assert merged.merge(parts) == 4  # images[0] was cached, images[2] is in both parts: each added once
    again = FeatureCache.open(tmp_path / "merged", encoder)
    assert len(again) == 5 and not again.unverified(hashes)
    for key, value in direct.lookup(hashes).items():
        assert torch.equal(again.lookup(hashes)[key], value), key
    assert merged.merge(parts) == 0  # nothing new: nothing rewritten
    assert (tmp_path / "direct" / "features.f16").read_bytes() == (tmp_path / "merged" / "features.f16").read_bytes()


def test_a_damaged_part_fails_the_merge_and_leaves_the_cache_as_it_was(tmp_path, encoder, images):
    cache = FeatureCache.open(tmp_path / "cache", encoder)
    hashes = cache.ensure(images[:2], progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "cache").iterdir()}
    part = _part(tmp_path / "part", encoder, images[2:])
    features = part / "features.f16"
    data = bytearray(features.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the second of three rows
    features.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"{part}: row 1 .*fails verification"):
        cache.merge([part])
    assert {p.name: p.read_bytes() for p in (tmp_path / "cache").iterdir()} == before  # no temp file left either
    assert len(FeatureCache.open(tmp_path / "cache", encoder).lookup(hashes)["pooled"]) == 2

    torch.manual_seed(1)
    other = create_encoder("clip-vit-tiny").freeze()  # same architecture, other weights
    with pytest.raises(DataError, match="every rank must load the same encoder weights"):
        cache.merge([_part(tmp_path / "other", other, images[2:3])])


def test_lookup_maps_the_features_and_reads_only_the_rows_asked_for(tmp_path, encoder):
    import tracemalloc

    cache = FeatureCache.open(tmp_path / "cache", encoder)
    rows, size = 4000, cache._index["row_size"]
    rng = np.random.default_rng(0)
    hashes = [f"{i:064x}" for i in range(rows)]
    cache._append((hashes[s:s + 500], rng.standard_normal((500, size)).astype(np.float16))
                  for s in range(0, rows, 500))
    reader = FeatureCache.open(tmp_path / "cache")
    file_bytes = (tmp_path / "cache" / "features.f16").stat().st_size
    assert file_bytes == rows * size * 2
    tracemalloc.start()
    try:
        feats = reader.lookup(hashes[1000:1008])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(reader._features(), np.memmap)
    assert feats["pooled"].shape == (8, 64)
    # 8 rows as float32 and their float16 copy are ~52 kB; the file is 8.7 MB
    assert peak < 8 * size * 4 * 4 < file_bytes // 50


def test_a_merge_killed_before_its_index_is_written_leaves_the_old_cache_valid(tmp_path, encoder, images,
                                                                                 monkeypatch):
    import encoders.cache as cache_module

    cache = FeatureCache.open(tmp_path / "cache", encoder)
    hashes = cache.ensure(images[:2], progress=False)
    truth = cache.lookup(hashes)
    part = _part(tmp_path / "part", encoder, images[2:])

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the features and keys are already renamed into place, the index is not

    monkeypatch.setattr(cache_module, "atomic_write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        cache.merge([part])
    monkeypatch.undo()
    assert len(cache) == 2 and torch.equal(cache.lookup(hashes)["grid"], truth["grid"])
    reopened = FeatureCache.open(tmp_path / "cache", encoder)
    assert len(reopened) == 2 and not reopened.unverified(hashes)
    for key, value in truth.items():
        assert torch.equal(reopened.lookup(hashes)[key], value), key
    assert reopened.merge([part]) == 3 and len(FeatureCache.open(tmp_path / "cache")) == 5


def _fill_at_once(folder: str, paths: list[str], barrier, results) -> None:
    """One of several processes filling one cache folder at the same moment; reports the rows it looked up."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    encoder = create_encoder("clip-vit-tiny").freeze()
    barrier.wait()
    try:
        cache = FeatureCache.open(folder, encoder)
        results.put(len(cache.lookup(cache.ensure(paths, batch_size=2, progress=False))["pooled"]))
    except Exception as e:  # the parent asserts on what each process saw
        results.put(f"{type(e).__name__}: {e}")


@pytest.mark.slow  # three spawned processes, each importing torch and the encoder afresh
def test_processes_filling_one_cache_at_once_keep_every_row(tmp_path, encoder, images):
    """Seeds run side by side on a fresh cache: each process's rows survive the others' (the folder's lock
    serialises the rebuild decision and every append), and every row is the one a lone process computes."""
    import multiprocessing

    subsets = [images[:3], images[2:], images[::2]]  # overlapping: some images asked by two or three processes
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(len(subsets)), ctx.Queue()
    workers = [ctx.Process(target=_fill_at_once, args=(str(tmp_path / "shared"), [str(p) for p in subset], barrier,
                                                       results)) for subset in subsets]
    for worker in workers:
        worker.start()
    looked_up = sorted(str(results.get(timeout=300)) for _ in workers)
    for worker in workers:
        worker.join()
    assert looked_up == sorted(str(len(s)) for s in subsets)
    shared = FeatureCache.open(tmp_path / "shared", encoder)
    hashes = [image_hash(p) for p in images]
    assert len(shared) == len(images) and not shared.unverified(hashes)
    alone = FeatureCache.open(tmp_path / "alone", encoder)
    expected = alone.lookup(alone.ensure(images, progress=False))
    got = shared.lookup(hashes)
    assert torch.equal(got["grid"], expected["grid"]) and torch.equal(got["pooled"], expected["pooled"])


def test_what_a_killed_writer_left_is_swept_when_the_cache_opens(tmp_path, encoder, images):
    """An append writes a whole new features file beside the old one: a writer killed then leaves a temp file the
    size of the cache. Every writer writes under the folder's lock, so whoever holds it may sweep them all."""
    FeatureCache.open(tmp_path / "cache", encoder).ensure(images[:1], progress=False)
    left = [tmp_path / "cache" / ".features.f16.ab12cd34.tmp", tmp_path / "cache" / ".keys.bin.zz99yy88.tmp"]
    for path in left:
        path.write_bytes(b"\0" * 1024)
    cache = FeatureCache.open(tmp_path / "cache", encoder)
    assert not any(p.exists() for p in left) and len(cache) == 1
