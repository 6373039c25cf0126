"""Caption pairs for pretraining: JSON lines, CSV, ROCO folders, `datasets`; bad input names what is wrong."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pretrain.data import load_captions, shuffle_captions, split_names
from encoders import ImageTable, StreamingImages, image_source, normalize
from vqa.training.augment import augment
from vqa.errors import DataError


def _image(path: Path, value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((20, 24), value, dtype=np.uint8)).save(path)
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_phantom_captions_resolve_images_and_keep_labels(phantom_dir):
    pairs = load_captions(phantom_dir / "captions", "train")
    assert len(pairs) > 20 and all(p.image.is_file() for p in pairs)
    assert {"modality", "plane", "region", "abnormal"} <= set(pairs[0].labels)
    assert all(p.labels["abnormal"] in ("yes", "no") for p in pairs)
    val = load_captions(phantom_dir / "captions", "dev")  # MedPix's name for the phantom's validate.jsonl
    assert val and {p.image for p in val}.isdisjoint({p.image for p in pairs})


def test_split_aliases():
    assert split_names("dev")[0] == "dev" and "validate" in split_names("dev") and "validation" in split_names("dev")
    assert split_names("custom") == ("custom",)


def test_medpix_style_jsonl_excludes_vqa_rad_images(tmp_path):
    _image(tmp_path / "images" / "a.jpg")
    _image(tmp_path / "images" / "b.jpg")
    _jsonl(tmp_path / "train.jsonl", [
        {"image": "images/a.jpg", "caption": "CT head.", "modality": "CT", "also_in_vqa_rad": False},
        {"image": "images/b.jpg", "caption": "MR brain.", "modality": "MR", "also_in_vqa_rad": True}])
    assert len(load_captions(tmp_path, "train")) == 2
    kept = load_captions(tmp_path, "train", exclude_vqa_rad=True)
    assert [p.caption for p in kept] == ["CT head."] and kept[0].labels["modality"] == "ct"
    # pairs that carry no mark cannot be cleared of VQA-RAD's images: refused, not passed on as if they were
    _jsonl(tmp_path / "validate.jsonl", [{"image": "images/a.jpg", "caption": "CT head."}])
    assert len(load_captions(tmp_path, "validate")) == 1
    with pytest.raises(DataError, match="--exclude-vqa-rad, but no pair has an 'also_in_vqa_rad' field"):
        load_captions(tmp_path, "validate", exclude_vqa_rad=True)


def test_one_file_is_one_split(tmp_path):
    """A file serves the split its name says, or train: never every split (the held-out pairs would be train's)."""
    _image(tmp_path / "x.png")
    for name in ("pairs.csv", "dev.csv"):
        (tmp_path / name).write_text("image,caption\nx.png,a chest film\n")
    assert len(load_captions(tmp_path / "pairs.csv", "train")) == 1
    with pytest.raises(DataError, match=r"pairs.csv: one file is one split, here the training split .* not split "
                                        r"'validate'.*--val-split none"):
        load_captions(tmp_path / "pairs.csv", "validate")
    assert len(load_captions(tmp_path / "dev.csv", "validate")) == 1  # dev is MedPix's validate
    with pytest.raises(DataError, match="here split 'validate', so it is not split 'train'"):
        load_captions(tmp_path / "dev.csv", "train")


def test_csv_with_named_columns(tmp_path):
    _image(tmp_path / "x.png")
    (tmp_path / "pairs.csv").write_text("path,text\nx.png,a chest film\n")
    pairs = load_captions(tmp_path / "pairs.csv", image_column="path", caption_column="text")
    assert pairs[0].caption == "a chest film" and pairs[0].image == tmp_path / "x.png"
    with pytest.raises(DataError, match="missing column.*'caption'"):
        load_captions(tmp_path / "pairs.csv", image_column="path")
    (tmp_path / "pairs.tsv").write_text("path\ttext\nx.png\ta chest film, frontal\n")  # tab-separated
    assert load_captions(tmp_path / "pairs.tsv", image_column="path", caption_column="text")[0].caption == \
        "a chest film, frontal"


def test_missing_field_missing_image_and_empty_file(tmp_path):
    _jsonl(tmp_path / "a.jsonl", [{"image": "nope.jpg", "text": "x"}])
    with pytest.raises(DataError, match="no field 'caption'"):
        load_captions(tmp_path / "a.jsonl")
    _jsonl(tmp_path / "b.jsonl", [{"image": "nope.jpg", "caption": "x"}])
    with pytest.raises(DataError, match=r"image file not found: .*nope\.jpg"):
        load_captions(tmp_path / "b.jsonl")
    (tmp_path / "c.jsonl").write_text("")
    with pytest.raises(DataError, match="no image-caption pairs"):
        load_captions(tmp_path / "c.jsonl")
    with pytest.raises(DataError, match="not found"):
        load_captions(tmp_path / "missing-folder", "train")


def test_roco_csv_layout(tmp_path):
    root = tmp_path / "roco"
    for split, table in (("train", "traindata.csv"), ("validation", "valdata.csv")):
        folder = root / split / "radiology"
        _image(folder / "images" / f"PMC1_{split}.jpg")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / table).write_text(f"id,name,caption\nROCO_1,PMC1_{split}.jpg,Axial CT of the {split}.\n")
    assert load_captions(root, "train")[0].caption == "Axial CT of the train."
    assert load_captions(root, "validate", fmt="roco")[0].caption == "Axial CT of the validation."
    # --data pointing at one split's folder: its pairs are train's, never served as another split's
    assert load_captions(root / "train", "train", fmt="roco")[0].caption == "Axial CT of the train."
    with pytest.raises(DataError, match="no ROCO folder for split 'validate'.*served only as the split it is named"):
        load_captions(root / "train", "validate", fmt="roco")
    assert load_captions(root / "validation", "validate", fmt="roco")[0].caption == "Axial CT of the validation."
    with pytest.raises(DataError, match="no pair has an 'also_in_vqa_rad' field"):  # ROCO marks none
        load_captions(root, "train", exclude_vqa_rad=True)


def test_roco_official_layout(tmp_path):
    folder = tmp_path / "data" / "test" / "radiology"
    _image(folder / "images" / "PMC4608653_cro-0008-0385-g01.jpg")
    (folder / "captions.txt").write_text("ROCO_00001\t CT scan showing a mass.\n")
    (folder / "dlinks.txt").write_text("ROCO_00001\t wget -O x ftp://host/oa_package/00/11/PMC4608653.tar.gz\t "
                                       "cro-0008-0385-g01.jpg\n")
    pairs = load_captions(tmp_path, "test", fmt="roco")
    assert pairs[0].caption == "CT scan showing a mass." and pairs[0].source_id == "ROCO_00001"


def test_datasets_save_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    images = [Image.fromarray(np.full((16, 16), v, dtype=np.uint8)) for v in (10, 200)]
    ds = datasets.Dataset.from_dict({"image": images, "caption": ["dark", "bright"]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "caption": datasets.Value("string")}))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "hf"))
    pairs = load_captions(tmp_path / "hf", "train")
    assert [p.caption for p in pairs] == ["dark", "bright"]
    assert isinstance(pairs[1].image, Image.Image) and np.asarray(pairs[1].image).mean() > 150
    with pytest.raises(DataError, match="no column 'text'"):
        load_captions(tmp_path / "hf", "train", caption_column="text")
    with pytest.raises(DataError, match=r"hf \[train\]: --exclude-vqa-rad, but no pair has an 'also_in_vqa_rad'"):
        load_captions(tmp_path / "hf", "train", exclude_vqa_rad=True)
    # the hub's spelling of a split is found under ours; a split the source lacks is an error, never train's pairs
    datasets.DatasetDict({"train": ds, "validation": ds.select([1])}).save_to_disk(str(tmp_path / "hub"))
    assert [p.caption for p in load_captions(tmp_path / "hub", "validate")] == ["bright"]
    with pytest.raises(DataError, match="no split 'test'"):
        load_captions(tmp_path / "hub", "test")
    datasets.Dataset.from_dict({"image": images, "caption": ["dark", "bright"]}, features=ds.features,
                               split="train").save_to_disk(str(tmp_path / "train-only"))
    with pytest.raises(DataError, match="a saved dataset of split 'train', not 'validate'"):
        load_captions(tmp_path / "train-only", "validate")


def test_shuffle_captions_is_a_seeded_permutation(phantom_dir):
    pairs = load_captions(phantom_dir / "captions", "train")
    a, b = shuffle_captions(pairs, 1), shuffle_captions(pairs, 1)
    assert [p.caption for p in a] == [p.caption for p in b]
    assert sorted(p.caption for p in a) == sorted(p.caption for p in pairs)
    assert [p.image for p in a] == [p.image for p in pairs]
    assert sum(x.caption != y.caption for x, y in zip(a, pairs)) > len(pairs) // 2


def test_image_table_matches_encoder_preprocess_and_streaming(phantom_dir):
    import torch

    from encoders import create_encoder

    enc = create_encoder("clip-vit-tiny")
    images = [p.image for p in load_captions(phantom_dir / "captions", "validate")]
    table = ImageTable(images, enc.image_size, enc.in_chans, progress=False)
    assert table.pixels.dtype == torch.uint8 and table.pixels.shape == (len(images), 3, 64, 64)
    torch.testing.assert_close(normalize(table.pixels, enc, torch.device("cpu")), enc.preprocess(images),
                               rtol=0, atol=0)  # bit for bit the encoder's own preprocessing
    stream = StreamingImages(images, enc.image_size, enc.in_chans, workers=0)
    got = list(stream.batches([[2, 0], [1]]))
    assert torch.equal(got[0], table.pixels[[2, 0]]) and torch.equal(got[1], table.pixels[[1]])
    assert isinstance(image_source(images, enc, "stream", progress=False), StreamingImages)
    assert isinstance(image_source(images, enc, "auto", progress=False), ImageTable)
    g = torch.Generator().manual_seed(0)
    moved = augment(table.pixels, g)
    assert moved.dtype == torch.uint8 and moved.shape == table.pixels.shape and not torch.equal(moved, table.pixels)


def test_corrupt_image_names_the_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(DataError, match="broken.jpg"):
        ImageTable([bad], 32, 3, progress=False)
