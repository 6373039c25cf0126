"""A hostile user's inputs: each is a one-line error (exit 2, no traceback) naming the file, field or value,
leaves nothing behind, and never trains on or serves wrong data."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from vqa.cli import main as cli

from .conftest import shared_data

TINY_TRAIN = ["--encoder", "clip-vit-tiny", "--head", "mevf-ban", "--head-arg", "hidden_dim=16", "--question-dim", "16",
              "--embed-dim", "8", "--epochs", "1", "--batch-size", "64", "--no-progress", "--device", "cpu",
              "--threads", "1"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def _vqa_rad_copy(phantom_dir: Path, tmp_path: Path, edit) -> Path:
    """A copy of the phantom's VQA-RAD folder whose trainset.json `edit(items)` changes."""
    root = tmp_path / "vqa-rad"
    shutil.copytree(phantom_dir / "vqa-rad", root)
    items = json.loads((root / "trainset.json").read_text())
    edit(items)
    (root / "trainset.json").write_text(json.dumps(items))
    return root


def _set(field, value, item=3):
    def edit(items):
        items[item][field] = value
    return edit


def test_an_image_stored_as_a_link_is_the_datasets_own(phantom_dir, tmp_path):
    """git-annex and DVC keep a dataset's files as links into a store elsewhere: the name stays in the folder."""
    from vqa.data import load_vqa_rad

    root = _vqa_rad_copy(phantom_dir, tmp_path, lambda items: None)
    store = tmp_path / "store"
    store.mkdir()
    image = root / "images" / json.loads((root / "trainset.json").read_text())[0]["image_name"]
    image.rename(store / "blob")
    image.symlink_to(store / "blob")
    assert load_vqa_rad(root, "train")[0].image == image


@pytest.mark.parametrize("edit, message", [
    (_set("answer", ["yes", "no"]), r"item 3: field 'answer' is a list \(\['yes', 'no'\]\); expected text"),
    (_set("answer", True), r"item 3: field 'answer' is a bool"),
    (_set("answer", None), r"item 3: field 'answer' is null"),
    (_set("question", {"text": "Is there a mass?"}), r"item 3: field 'question' is a dict"),
    (_set("image_name", "../" * 30 + "etc/hostname"), r"item 3: image path '(\.\./)+etc/hostname' leaves the "
                                                         r"dataset folder"),
    (_set("image_name", "a-folder"), r"item 3: image 'a-folder' is a directory"),
], ids=["answer-list", "answer-true", "answer-null", "question-object", "path-escapes", "directory-image"])
def test_non_text_fields_and_escaping_paths_are_errors(phantom_dir, tmp_path, capsys, edit, message):
    import re

    if "hostname" in message and not Path("/etc/hostname").is_file():
        pytest.skip("no /etc/hostname to escape to")
    root = _vqa_rad_copy(phantom_dir, tmp_path, edit)
    (root / "images" / "a-folder").mkdir()
    code, _, err = run(capsys, "data", "stats", str(root), "--format", "vqa-rad")
    assert code == 2 and re.search(message, err), err
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "--format", "vqa-rad", "--data", str(root), "--out", str(out), *TINY_TRAIN)
    assert code == 2 and re.search(message, err), err
    assert not out.exists() or not any(out.iterdir())  # not even run_config.json


def test_numbers_stay_answers(phantom_dir, tmp_path, capsys):
    root = _vqa_rad_copy(phantom_dir, tmp_path, _set("answer", 2))
    code, out, _ = run(capsys, "data", "stats", str(root), "--format", "vqa-rad", "--json")
    assert code == 0 and json.loads(out)["splits"]["train"]["questions"] > 0


def _slake(source: Path, tmp_path: Path, edit) -> Path:
    root = tmp_path / "slake"
    shutil.copytree(source, root)
    for split in ("train", "validate", "test"):
        path = root / f"{split}.json"
        if path.is_file():
            items = json.loads(path.read_text())
            edit(split, items)
            path.write_text(json.dumps(items, ensure_ascii=False))
    return root


def _empty_first_english_answer(split, items):
    if split == "train":
        next(it for it in items if it.get("q_lang", "en") == "en")["answer"] = ""


@pytest.mark.parametrize("source", ["phantom", "shipped sample"])
def test_one_empty_answer_is_skipped_and_counted_not_fatal(phantom_dir, tmp_path, capsys, caplog, source):
    folder = shared_data("slake-sample") if source == "shipped sample" else phantom_dir / "slake"
    root = _slake(folder, tmp_path, _empty_first_english_answer)
    code, out, err = run(capsys, "data", "stats", str(root), "--format", "slake", "--splits", "train")
    assert code == 0, err
    assert "skipped 1 unusable question" in out and "field 'answer' is empty" in out
    assert "skipped 1 unusable question" in caplog.text  # the loader's warning, counted
    code, _, err = run(capsys, "data", "stats", str(root), "--format", "slake", "--splits", "train", "--strict")
    assert code == 2 and "field 'answer' is empty" in err and "missing" not in err


def test_a_language_without_questions_names_the_languages_there_are(phantom_dir, tmp_path, capsys):
    def all_chinese(split, items):
        for it in items:
            it["q_lang"] = "zh"
    root = _slake(phantom_dir / "slake", tmp_path, all_chinese)
    code, _, err = run(capsys, "data", "stats", str(root), "--format", "slake")
    assert code == 2 and "no questions in language 'en'" in err and "'zh'" in err and "--lang zh" in err
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "--format", "slake", "--data", str(root), "--out", str(out), *TINY_TRAIN)
    assert code == 2 and "--lang zh" in err and not out.exists()


def test_duplicate_questions_are_reported_and_warned(phantom_dir, tmp_path, capsys, caplog):
    root = _vqa_rad_copy(phantom_dir, tmp_path, lambda items: items.append(dict(items[0])))
    code, out, _ = run(capsys, "data", "stats", str(root), "--format", "vqa-rad")
    assert code == 0 and "1 duplicate question(s)" in out
    code, _, err = run(capsys, "train", "--format", "vqa-rad", "--data", str(root), "--out", str(tmp_path / "r"),
                       *TINY_TRAIN)
    assert code == 0 and "repeat an earlier one" in caplog.text


def test_a_run_of_no_epochs_is_refused_before_any_work(phantom_dir, tmp_path, capsys):
    code, _, err = run(capsys, "train", "--data", str(phantom_dir / "vqa-rad"), "--out", str(tmp_path / "run"),
                       *TINY_TRAIN, "--epochs", "0")  # the last --epochs stands
    assert code == 2 and "--epochs must be at least 1, got 0" in err and not (tmp_path / "run").exists()


def test_a_nan_run_exits_2_and_writes_no_bundle(phantom_dir, tmp_path, capsys):
    from encoders import create_encoder

    encoder = create_encoder("clip-vit-tiny")
    with torch.no_grad():
        encoder.vision_model.post_layernorm.weight[0] = float("nan")
    encoder.save_pretrained(tmp_path / "nan-encoder")
    argv = [a if a != "clip-vit-tiny" else str(tmp_path / "nan-encoder") for a in TINY_TRAIN]
    argv += ["--data", str(phantom_dir / "vqa-rad"), "--cache-dir", str(tmp_path / "cache")]
    # frozen: its features are refused before the cache stores them; fine-tuned: the first step's loss stops the run
    code, _, err = run(capsys, "train", "--out", str(tmp_path / "frozen"), *argv)
    assert code == 2 and "its grid features reach nan" in err and not (tmp_path / "frozen" / "bundle").exists()
    code, _, err = run(capsys, "train", "--out", str(tmp_path / "run"), "--encoder-mode", "finetune", *argv)
    assert code == 2 and "epoch 1, step 1: loss is nan" in err
    assert not (tmp_path / "run" / "bundle").exists()


def test_a_damaged_feature_cache_is_rebuilt_not_trusted(phantom_dir, tmp_path, capsys, caplog):
    cache = tmp_path / "cache"
    args = ["train", "--data", str(phantom_dir / "vqa-rad"), "--cache-dir", str(cache), *TINY_TRAIN]
    assert run(capsys, *args, "--out", str(tmp_path / "a"))[0] == 0
    (index_path,) = cache.glob("*/index.json")
    index = json.loads(index_path.read_text())
    first, second = list(index["rows"])[:2]
    index["rows"][first], index["rows"][second] = index["rows"][second], index["rows"][first]
    index_path.write_text(json.dumps(index))
    assert run(capsys, *args, "--out", str(tmp_path / "b"))[0] == 0
    assert "fail verification" in caplog.text and "rebuilding" in caplog.text
    # the rebuilt cache gives the model the features of a fresh one: the same trained weights
    assert run(capsys, *[a if a != str(cache) else str(tmp_path / "fresh") for a in args], "--out",
               str(tmp_path / "c"))[0] == 0
    from safetensors.torch import load_file

    b, c = (load_file(str(tmp_path / x / "bundle" / "model.safetensors")) for x in "bc")
    assert all(torch.equal(b[k], c[k]) for k in b)


@pytest.fixture(scope="module")
def tiny_bundle(phantom_dir, tmp_path_factory) -> Path:
    from vqa.train import TrainConfig, train

    tmp = tmp_path_factory.mktemp("tiny-bundle")
    return train(TrainConfig(data=str(phantom_dir / "vqa-rad"), encoder="clip-vit-tiny", head_args={"hidden_dim": 16},
                             question_dim=16, embed_dim=8, epochs=1, progress=False, device="cpu",
                             out=str(tmp / "run"), cache_dir=str(tmp / "cache")))


def _predict(capsys, bundle: Path, image, question: str = "Is there a lesion?") -> tuple[int, str, str]:
    return run(capsys, "predict", "--bundle", str(bundle), "--image", str(image), "--question", question)


def test_images_that_would_cost_too_much_are_refused_before_decoding(tiny_bundle, tmp_path, capsys, monkeypatch):
    big = tmp_path / "huge.png"
    Image.new("L", (9000, 7000)).save(big)  # 63 Mpx of zeros: a few hundred KB on disk
    code, _, err = _predict(capsys, tiny_bundle, big)
    assert code == 2 and "9000x7000" in err and "above the limit of 50 Mpx" in err and "huge.png" in err
    monkeypatch.setenv("MEDVQA_MAX_IMAGE_PIXELS", str(70_000_000))  # the limit is configurable
    assert _predict(capsys, tiny_bundle, big)[0] == 0


def test_an_image_past_pils_own_bound_names_its_file(tmp_path, monkeypatch):
    """PIL refuses images over twice its MAX_IMAGE_PIXELS (~179 Mpx) itself, with an error of its own type, which
    a raised MEDVQA_MAX_IMAGE_PIXELS lets through: it must still say which file (PIL's bound shrunk here)."""
    from encoders import load_image

    path = tmp_path / "scan.png"
    Image.new("L", (100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError, match=r"scan\.png: image too large for PIL to decode"):
        load_image(path)


def test_a_large_jpeg_is_decoded_at_reduced_size():
    from encoders import load_image

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "large.jpg"
        Image.new("RGB", (8192, 4096), (90, 90, 90)).save(path, quality=70)
        assert load_image(path).size == (8192, 4096)
        reduced = load_image(path, max_side=2048)
        assert reduced.size == (2048, 1024)  # JPEG draft: 1/4 scale, never below what was asked


def test_a_directory_is_not_an_image(tiny_bundle, tmp_path, capsys):
    code, _, err = _predict(capsys, tiny_bundle, tmp_path)
    assert code == 2 and "is a directory" in err and "not found" not in err


def _bundle_copy(bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    return copy


def test_bundle_dimensions_that_do_not_match_its_weights(tiny_bundle, tmp_path, capsys, phantom_dir):
    copy = _bundle_copy(tiny_bundle, tmp_path)
    config = json.loads((copy / "config.json").read_text())
    config["head"]["config"]["k"] = 2  # the bilinear rank: the same tensors, other shapes
    (copy / "config.json").write_text(json.dumps(config))
    image = next((phantom_dir / "vqa-rad" / "images").iterdir())
    code, _, err = _predict(capsys, copy, image)
    shapes = err.replace(str(copy), "BUNDLE")  # the tmp path's digits (pytest-32, ...) must not stand in for them
    assert code == 2 and "model.safetensors: tensor" in shapes and "48" in shapes and "32" in shapes, err


def test_a_truncated_encoder_file_is_named(tiny_bundle, tmp_path, capsys, phantom_dir):
    copy = _bundle_copy(tiny_bundle, tmp_path)
    weights = copy / "encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    code, _, err = _predict(capsys, copy, next((phantom_dir / "vqa-rad" / "images").iterdir()))
    assert code == 2 and "encoder/model.safetensors: not a readable safetensors file" in err


def test_a_pickle_only_hugging_face_folder_is_refused_unread(tmp_path, capsys, phantom_dir):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    folder = tmp_path / "hf-clip"
    CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, image_size=32, patch_size=16)).save_pretrained(folder)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")  # never opened
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "--data", str(phantom_dir / "vqa-rad"), "--out", str(out),
                       *[a if a != "clip-vit-tiny" else str(folder) for a in TINY_TRAIN])
    assert code == 2 and "pytorch_model.bin" in err and "safetensors only" in err and "save_pretrained" in err
    assert not out.exists()


def test_invalid_json_names_the_line_and_column(phantom_dir, tmp_path, capsys):
    root = tmp_path / "vqa-rad"
    shutil.copytree(phantom_dir / "vqa-rad", root)
    (root / "trainset.json").write_text('[\n  {"image_name": "a.jpg",, "question": "q"}\n]')
    code, _, err = run(capsys, "data", "stats", str(root), "--format", "vqa-rad")
    assert code == 2 and "trainset.json: line 2: invalid JSON" in err and "column 26" in err


def test_temp_files_of_a_killed_run_are_swept_at_the_next_start(phantom_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    stale_file, stale_dir = out / ".checkpoint.pt.k1ll3d_x.tmp", out / ".bundle.k1ll3d_y.tmp"
    stale_file.write_bytes(b"half a checkpoint")
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_bytes(b"half a bundle")
    theirs = out / ".notes.txt.tmp"  # not our pattern: left alone
    theirs.write_text("someone else's")
    old = time.time() - 3600
    for path in (stale_file, stale_dir, theirs):
        os.utime(path, (old, old))
    assert run(capsys, "train", "--data", str(phantom_dir / "vqa-rad"), "--out", str(out), *TINY_TRAIN)[0] == 0
    assert not stale_file.exists() and not stale_dir.exists() and theirs.exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp") and p != theirs]


def test_a_file_that_is_not_utf8_is_named(tmp_path):
    """A spreadsheet's Latin-1 export of a batch or a dataset CSV: the error says which file, and what to do."""
    from vqa.errors import DataError
    from vqa.io import read_csv_numbered, read_jsonl_numbered

    (tmp_path / "batch.csv").write_bytes("image,question\nscan.png,Is the f\xe9mur broken?\n".encode("latin-1"))
    (tmp_path / "batch.jsonl").write_bytes('{"image": "scan.png", "question": "f\xe9mur?"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"batch\.csv: not UTF-8 text \(byte 0xe9 .*save it as UTF-8"):
        read_csv_numbered(tmp_path / "batch.csv", ("image", "question"))
    with pytest.raises(DataError, match=r"batch\.jsonl: not UTF-8 text"):
        read_jsonl_numbered(tmp_path / "batch.jsonl")


def test_a_utf8_file_with_a_byte_order_mark_reads_as_without(tmp_path):
    """Excel's "CSV UTF-8" starts with a byte-order mark; the first column is still `image`."""
    from vqa.io import read_csv_numbered, read_jsonl_numbered

    (tmp_path / "batch.csv").write_bytes("\ufeffimage,question\nscan.png,Is the f\xe9mur broken?\n".encode())
    (tmp_path / "batch.jsonl").write_bytes('\ufeff{"image": "scan.png", "question": "f\xe9mur?"}\n'.encode())
    assert read_csv_numbered(tmp_path / "batch.csv", ("image", "question")) == [
        (2, {"image": "scan.png", "question": "Is the f\xe9mur broken?"})]
    assert read_jsonl_numbered(tmp_path / "batch.jsonl") == [(1, {"image": "scan.png", "question": "f\xe9mur?"})]


def test_replacing_a_folder_never_loses_its_previous_copy(tmp_path, monkeypatch):
    """atomic_dir swaps a folder by two renames: a failed second rename puts the old copy back, and a writer
    killed between them leaves it where the next run's sweep puts it back."""
    from encoders import _files
    from encoders._files import atomic_dir, sweep_stale_temps

    bundle = tmp_path / "bundle"
    with atomic_dir(bundle) as tmp:
        (tmp / "model.safetensors").write_text("good")
    real, calls = os.replace, []

    def second_fails(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("disk gone")
        return real(src, dst)

    monkeypatch.setattr(_files.os, "replace", second_fails)
    with pytest.raises(OSError, match="disk gone"):
        with atomic_dir(bundle, overwrite=True) as tmp:
            (tmp / "model.safetensors").write_text("new")
    monkeypatch.setattr(_files.os, "replace", real)
    assert (bundle / "model.safetensors").read_text() == "good" and [p.name for p in tmp_path.iterdir()] == ["bundle"]
    # killed between the renames: the old copy set aside, nothing at the name
    aside = tmp_path / ".bundle.ab12cd34.tmp"
    aside.mkdir()
    os.replace(bundle, aside / "bundle")
    old = time.time() - 3600
    os.utime(aside, (old, old))
    assert sweep_stale_temps(tmp_path) == [aside]
    assert (bundle / "model.safetensors").read_text() == "good" and not aside.exists()


def test_a_dicom_without_pydicom_is_an_input_error_naming_the_remedy(tmp_path, monkeypatch):
    """pydicom is an optional extra: without it a DICOM upload is a message in the page, not an internal error."""
    from encoders import images
    from vqa.errors import DataError
    from vqa.predictor import read_image

    def no_pydicom(path):
        raise ImportError(f"{path}: reading DICOM needs pydicom: pip install 'medvqa[dicom]'")

    monkeypatch.setattr(images, "load_dicom", no_pydicom)
    (tmp_path / "scan.dcm").write_bytes(b"\0" * 128 + b"DICM")
    with pytest.raises(DataError, match=r"scan\.dcm: reading DICOM needs pydicom"):
        read_image(tmp_path / "scan.dcm")


def test_a_weight_beyond_float16_is_named_before_it_is_rounded(monkeypatch):
    """--weights-dtype float16 rounds the head before validation: a weight past 65504 would turn inf there, and the
    run end in 'training diverged'; it is named, with the remedy, and the head left as it was."""
    from vqa.bundle import round_weights
    from vqa.errors import DataError

    head = torch.nn.Linear(3, 2)
    with torch.no_grad():
        head.weight[0, 0] = 7e4
    before = head.weight.clone()
    with pytest.raises(DataError, match=r"float16: the head's weight holds values beyond that type's range"):
        round_weights(head, "float16")
    assert torch.equal(head.weight, before)
    with torch.no_grad():
        head.weight[0, 0] = 1.0
    unrounded = head.weight.clone()
    round_weights(head, "float16")  # in range: rounded as the bundle stores it
    assert torch.equal(head.weight, unrounded.half().float()) and not torch.equal(head.weight, unrounded)


def test_features_past_float16_are_refused_before_the_cache_stores_them():
    """The feature cache stores float16: an encoder whose outputs reach past 65504 would store inf for good (and
    every rebuild the same), so encoding says which output and what to do."""
    from encoders import create_encoder
    from vqa.errors import DataError

    torch.manual_seed(0)
    encoder = create_encoder("clip-vit-tiny").eval()
    plain = encoder.forward_features
    encoder.forward_features = lambda pixels: {k: v * 1e6 if k == "pooled" else v for k, v in plain(pixels).items()}
    with pytest.raises(DataError, match=r"clip-vit-tiny: its pooled features reach .*beyond float16's 65504"):
        encoder.encode([Image.new("RGB", (32, 32), (90, 90, 90))])
    encoder.forward_features = plain
    assert encoder.encode([Image.new("RGB", (32, 32), (90, 90, 90))])["pooled"].dtype == torch.float16


def test_eval_reports_the_test_questions_it_could_not_use(trained_bundle, predictor_phantom, tmp_path):
    """A test question with an empty answer is skipped by the loader: the report says how many, since a paper
    that counts it wrong has another denominator."""
    from vqa.evaluate import evaluate, markdown_report

    from ._bundle import feature_cache_copy

    data = shutil.copytree(predictor_phantom / "vqa-rad", tmp_path / "vqa-rad")
    items = json.loads((data / "testset.json").read_text())
    items[0]["answer"] = ""
    (data / "testset.json").write_text(json.dumps(items))
    report = evaluate(trained_bundle, "vqa-rad", str(data), device="cpu", progress=False,
                      cache_dir=str(feature_cache_copy(trained_bundle, tmp_path / "cache")))[0]
    assert report["unusable"]["n"] == 1 and report["subsets"]["all"]["n"] == len(items) - 1
    assert "1 question(s) of the split could not be used" in markdown_report(report)
    assert str(tmp_path) not in json.dumps(report["unusable"])
    assert report["unusable"]["examples"][0].startswith("vqa-rad/testset.json: item 0")
