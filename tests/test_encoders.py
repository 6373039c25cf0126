"""Encoders: registry, shapes, gradients, save/load round trips, fingerprints, HF CLIP folders."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from encoders import (CLIPVisionEncoder, ImageEncoder, create_encoder, list_encoders, register_encoder)
from encoders._errors import DataError
from encoders.clip import OPENAI_CLIP_MEAN

TINY = ["clip-vit-tiny", "resnet-tiny", "vit-tiny", "mevf"]
BIG = {"clip-vit-b32", "clip-vit-b16", "pubmedclip-vit-b32", "clip-rn50", "resnet18", "resnet50",
       "vit_base_patch32_224", "vit_base_patch16_224",
       "efficientnet-lite0-imagenet", "efficientnet-lite1-imagenet", "efficientnet-lite2-imagenet"}


def _pixels(encoder: ImageEncoder, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(batch, encoder.in_chans, encoder.image_size, encoder.image_size, generator=g)


def _tiny(name: str) -> ImageEncoder:
    torch.manual_seed(0)
    return create_encoder(name)


def test_every_registered_encoder_is_known_tiny_or_big():
    # a new registration must be added to one of the lists (and so to the tests below)
    assert set(list_encoders()) == set(TINY) | BIG
    assert list_encoders("clip-*") == ["clip-rn50", "clip-vit-b16", "clip-vit-b32", "clip-vit-tiny"]


@pytest.mark.parametrize("name", TINY)
def test_tiny_forward_shapes_and_attributes(name):
    enc = _tiny(name).eval()
    with torch.no_grad():
        out = enc(_pixels(enc))
    n = enc.grid_size[0] * enc.grid_size[1]
    assert out["grid"].shape == (2, n, enc.feature_dim)
    assert out["pooled"].shape == (2, enc.feature_dim)
    assert torch.isfinite(out["grid"]).all() and torch.isfinite(out["pooled"]).all()
    assert enc.in_chans in (1, 3) and len(enc.mean) in (1, enc.in_chans) and len(enc.std) == len(enc.mean)
    assert enc.name == name
    json.dumps(enc.export_config())  # config is JSON-serialisable


@pytest.mark.parametrize("name", TINY)
def test_tiny_forward_backward(name):
    enc = _tiny(name).train()
    out = enc(_pixels(enc))
    loss = sum(v.pow(2).mean() for v in out.values())  # every output, MEVF's reconstruction too
    loss.backward()
    grads = [p.grad for p in enc.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", ["clip-vit-b32", "resnet50"])
def test_big_encoder_one_forward(name):
    enc = _tiny(name).eval()
    with torch.no_grad():
        out = enc(_pixels(enc, batch=1))
    assert enc.grid_size == (7, 7)
    assert out["grid"].shape == (1, 49, enc.feature_dim) and out["pooled"].shape == (1, enc.feature_dim)


@pytest.mark.parametrize("name", TINY)
def test_save_pretrained_round_trip(name, tmp_path):
    enc = _tiny(name).eval()
    folder = enc.save_pretrained(tmp_path / "enc")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert not list(tmp_path.glob(".*tmp*"))  # no temp folder left behind
    loaded = create_encoder(folder).eval()
    assert type(loaded) is type(enc) and loaded.name == name and loaded.config == enc.config
    assert loaded.fingerprint() == enc.fingerprint()
    x = _pixels(enc)
    with torch.no_grad():
        a, b = enc(x), loaded(x)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_save_into_existing_folder_keeps_other_files(tmp_path):
    enc = _tiny("clip-vit-tiny")
    (tmp_path / "answers.json").write_text("[]")
    enc.save_pretrained(tmp_path)
    assert (tmp_path / "answers.json").exists() and (tmp_path / "model.safetensors").exists()
    assert create_encoder(tmp_path).fingerprint() == enc.fingerprint()


def test_fingerprint_is_stable_and_tracks_weights_and_config():
    a, b = _tiny("resnet-tiny"), _tiny("resnet-tiny")
    assert a.fingerprint() == b.fingerprint()  # same seed, same weights
    with torch.no_grad():
        next(b.parameters()).view(-1)[0] += 1e-3
    assert a.fingerprint() != b.fingerprint()
    torch.manual_seed(0)
    other = create_encoder("resnet-tiny", image_size=96)  # same weights, other config
    assert other.fingerprint() != a.fingerprint()


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError) as err:
        create_encoder("clip-vit-b33")
    message = str(err.value)
    assert "clip-vit-b33" in message and "clip-vit-b32" in message and "mevf" in message and "timm:" in message


def test_register_encoder_rejects_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        register_encoder("mevf")(lambda **kw: None)


def test_generic_timm_name_and_projection():
    torch.manual_seed(0)
    enc = create_encoder("timm:resnet10t", image_size=64, in_chans=1, embed_dim=32, pool="avg")
    assert enc.name == "timm:resnet10t" and enc.in_chans == 1 and enc.feature_dim == 32
    with torch.no_grad():
        out = enc(_pixels(enc))
    assert out["grid"].shape == (2, 4, 32)
    # pool="avg" is the mean of the (linearly projected) grid
    assert torch.allclose(out["pooled"], out["grid"].mean(1), atol=1e-5)
    # grayscale from timm's RGB statistics: images go in through its own preprocessing, one channel
    rgb = create_encoder("timm:resnet10t", image_size=64)
    assert len(rgb.mean) == 3 and enc.mean == pytest.approx((sum(rgb.mean) / 3,))
    assert enc.encode([Image.new("RGB", (80, 70), (200, 10, 10)), np.zeros((30, 30), np.uint8)])["grid"].shape == \
        (2, 4, 32)


def test_preprocess_describes_the_input():
    enc = _tiny("clip-vit-tiny")
    images = [Image.new("RGB", (100, 80), (255, 0, 0)), np.zeros((30, 30), dtype=np.uint16)]
    x = enc.preprocess(images)
    assert x.shape == (2, 3, 64, 64) and x.dtype == torch.float32
    red = (1.0 - enc.mean[0]) / enc.std[0]
    assert torch.allclose(x[0, 0], torch.full((64, 64), red), atol=1e-4)
    gray = _tiny("mevf").preprocess(images)
    assert gray.shape == (2, 1, 128, 128) and 0.0 <= gray.min() and gray.max() <= 1.0


def test_freeze_keeps_eval_mode_and_no_grads():
    enc = _tiny("resnet-tiny").freeze()
    assert enc.frozen and not enc.training
    assert not any(p.requires_grad for p in enc.parameters())
    torch.nn.Sequential(enc).train()  # a parent switching to train mode
    assert not enc.training
    enc.unfreeze()
    assert enc.training and all(p.requires_grad for p in enc.parameters())


# -- Hugging Face CLIP folders ---------------------------------------------------------

def _tiny_clip_model():
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    enc = create_encoder("clip-vit-tiny")
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    config = CLIPConfig(vision_config=enc.hf_vision_config().to_dict(), text_config=text,
                        projection_dim=enc.config.projection_dim)
    return enc, CLIPModel(config).eval()


def test_local_clipmodel_folder_loads_vision_tower(tmp_path):
    _, clip = _tiny_clip_model()
    clip.save_pretrained(tmp_path / "clip")
    enc = create_encoder(tmp_path / "clip").eval()
    assert isinstance(enc, CLIPVisionEncoder) and enc.grid_size == (4, 4) and enc.feature_dim == 64
    x = _pixels(enc)
    with torch.no_grad():
        out = enc(x)
        reference = clip.vision_model(pixel_values=x)
        image_embeds = clip.get_image_features(pixel_values=x)
    assert torch.allclose(out["pooled"], reference.pooler_output, atol=1e-5)
    if not torch.is_tensor(image_embeds):  # transformers 5 returns an output object
        image_embeds = image_embeds.pooler_output
    assert torch.allclose(clip.visual_projection(out["pooled"]), image_embeds, atol=1e-5)


def test_local_clipvisionmodel_folder_and_preprocessor_stats(tmp_path):
    from transformers import CLIPVisionModel

    torch.manual_seed(0)
    enc = create_encoder("clip-vit-tiny")
    hf = CLIPVisionModel(enc.hf_vision_config())
    hf.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.25] * 3}))
    loaded = create_encoder(tmp_path)
    assert loaded.mean == (0.5, 0.5, 0.5) and loaded.std == (0.25, 0.25, 0.25)
    # and our own save of it round-trips as an hf_clip family encoder
    again = create_encoder(loaded.save_pretrained(tmp_path / "ours"))
    assert again.fingerprint() == loaded.fingerprint()


def test_a_hub_clip_reads_its_repositorys_preprocessor_stats(tmp_path, monkeypatch, caplog):
    from huggingface_hub import constants
    from transformers import CLIPVisionModel

    from ._released import populate_hub_cache

    assert constants.HF_HUB_OFFLINE  # read from the populated cache only
    torch.manual_seed(0)
    CLIPVisionModel(create_encoder("clip-vit-tiny").hf_vision_config()).save_pretrained(tmp_path / "with")
    (tmp_path / "with" / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3,
                                                                             "image_std": [0.25] * 3}))
    CLIPVisionModel(create_encoder("clip-vit-tiny").hf_vision_config()).save_pretrained(tmp_path / "without")
    populate_hub_cache(tmp_path / "hub", "medvqa-test/tiny-clip", tmp_path / "with")
    populate_hub_cache(tmp_path / "hub", "medvqa-test/tiny-clip-bare", tmp_path / "without")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = create_encoder("medvqa-test/tiny-clip")
    assert (loaded.mean, loaded.std, loaded.config.hub_id) == ((0.5,) * 3, (0.25,) * 3, "medvqa-test/tiny-clip")
    with caplog.at_level("WARNING"):  # cached without it, offline: OpenAI's, and said
        bare = create_encoder("medvqa-test/tiny-clip-bare")
    assert bare.mean == OPENAI_CLIP_MEAN and "preprocessor_config.json is not in the hub cache" in caplog.text


@pytest.mark.parametrize("stats,message", [
    ('{"image_mean": [0.5, 0.5, 0.5], "image_std": ', r"preprocessor_config.json: line 1: invalid JSON"),
    ('{"image_mean": "imagenet"}', "'image_mean' is 'imagenet'; expected three numbers"),
    ('{"image_std": [0.2, -0.2, 0.2]}', "'image_std' is .*must be positive"),
])
def test_hugging_face_folder_with_bad_preprocessor_stats_is_refused(stats, message, tmp_path):
    from transformers import CLIPVisionModel

    CLIPVisionModel(create_encoder("clip-vit-tiny").hf_vision_config()).save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(stats)
    with pytest.raises(DataError, match=message):
        create_encoder(tmp_path)


def test_tower_plugs_into_a_full_clipmodel():
    enc, clip = _tiny_clip_model()
    clip.vision_model.load_state_dict(enc.vision_model.state_dict())  # same parameter names
    wrapped = CLIPVisionEncoder.from_clip_model(clip, name="pretrained-clip")
    assert wrapped.vision_model is clip.vision_model and wrapped.config.hidden_size == enc.feature_dim
    x = _pixels(enc)
    with torch.no_grad():
        assert torch.allclose(enc.eval()(x)["pooled"], wrapped.eval()(x)["pooled"], atol=1e-6)


def test_hub_id_offline_error_names_the_id():
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        pytest.skip("needs HF_HUB_OFFLINE=1 (a real network attempt is slow)")
    with pytest.raises(OSError, match="openai/clip-vit-base-patch32.*no network"):
        create_encoder("openai/clip-vit-base-patch32")
    with pytest.raises(OSError, match="flaviagiammarino/pubmed-clip-vit-base-patch32"):
        create_encoder("pubmedclip-vit-b32", pretrained=True)


def test_folder_and_hub_ids_take_no_options(tmp_path):
    _tiny("mevf").save_pretrained(tmp_path)
    with pytest.raises(TypeError, match="takes no options"):
        create_encoder(tmp_path, image_size=64)
    with pytest.raises(FileNotFoundError, match="nope"):
        create_encoder(str(tmp_path / "nope"))


# -- gradient checkpointing ----------------------------------------------------------------------------------------
def _kept_for_backward(tower, *inputs) -> tuple[int, dict[str, torch.Tensor]]:
    """(bytes the forward keeps for the backward pass, the gradients of a fixed loss) of one training step."""
    kept = 0

    def pack(t):
        nonlocal kept
        kept += t.numel() * t.element_size()
        return t

    tower.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = tower(*inputs)
    sum(v.float().square().mean() for v in out.values() if v.requires_grad).backward()
    return kept, {n: p.grad.clone() for n, p in tower.named_parameters() if p.grad is not None}


def _assert_checkpointing_keeps_less_for_the_same_gradients(tower, *inputs, at_most: float):
    kept, grads = _kept_for_backward(tower, *inputs)
    tower.set_grad_checkpointing()
    assert tower.grad_checkpointing
    kept_now, grads_now = _kept_for_backward(tower, *inputs)
    assert kept_now < at_most * kept, (kept_now, kept)
    assert grads_now.keys() == grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grads_now[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    tower.set_grad_checkpointing(False)
    assert _kept_for_backward(tower, *inputs)[0] == kept


@pytest.mark.parametrize("name", ["clip-vit-tiny", "vit-tiny", "resnet-tiny"])
def test_grad_checkpointing_keeps_less_for_the_same_gradients(name):
    torch.manual_seed(0)
    enc = create_encoder(name).train()
    x = torch.randn(2, enc.in_chans, enc.image_size, enc.image_size)
    if enc.batch_norms:  # the recompute would move the running statistics twice: refused, and nothing switched on
        with pytest.raises(DataError, match="BatchNorm layers a second time"):
            enc.set_grad_checkpointing()
        assert not enc.grad_checkpointing
        enc.freeze_norm_()
    _assert_checkpointing_keeps_less_for_the_same_gradients(enc, x, at_most=0.5)


def test_a_text_tower_published_in_half_precision_reloads_in_float32(tmp_path):
    """transformers builds a model in the dtype its config names: a tower from an fp16 checkpoint trains in fp32
    here, and its bundle's config must rebuild it so (else its trained weights are rounded as they load)."""
    from encoders.text import TextTower, create_text_tower, load_pretrained_text, save_tokenizer

    torch.manual_seed(0)
    tower = create_text_tower("bert-tiny", captions=["a chest x-ray with an effusion", "an axial ct of the head"])
    tower.model.half().save_pretrained(tmp_path / "fp16")
    save_tokenizer(tower.tokenizer, tmp_path / "fp16")
    loaded = load_pretrained_text(tmp_path / "fp16")
    config = loaded.export_config()
    assert "dtype" not in config["hf_config"] and "torch_dtype" not in config["hf_config"]
    old = {**config, "hf_config": {**config["hf_config"], "dtype": "float16"}}  # as an earlier medvqa saved it
    for rebuilt in (TextTower.from_config(config, loaded.tokenizer), TextTower.from_config(old, loaded.tokenizer)):
        assert {p.dtype for p in rebuilt.parameters()} == {torch.float32}


def test_grad_checkpointing_of_a_text_tower_and_where_there_is_none():
    from encoders.text import create_text_tower

    torch.manual_seed(0)
    tower = create_text_tower("bert-tiny", captions=["a chest x-ray with an effusion", "an axial ct of the head"])
    batch = tower.tokenize(["a chest x-ray", "an axial ct of the head with an effusion"])
    _assert_checkpointing_keeps_less_for_the_same_gradients(tower.train(), batch["input_ids"],
                                                            batch["attention_mask"], at_most=0.5)
    mevf = create_encoder("mevf").freeze_norm_()
    with pytest.raises(DataError, match="MEVFEncoder has no gradient checkpointing"):
        mevf.set_grad_checkpointing()
    assert not mevf.grad_checkpointing
