"""Released CLIP towers in their own formats (open_clip hf-hub:/local-dir:/open_clip:, OpenAI state dicts and
TorchScript archives, PMC-CLIP): features equal the reference implementation on the same weights, saved
folders reproduce them exactly, pickles with code are refused, full-size key layouts match."""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("open_clip")
import open_clip  # noqa: E402

from encoders import FeatureCache, OpenCLIPEncoder, create_encoder, openai_model_cfg  # noqa: E402
from encoders._errors import DataError  # noqa: E402

from ._released import (OPENAI_MEAN, RN, TIMM_VIT, VIT, open_clip_model, openai_state_dict,  # noqa: E402
                        pixels, populate_hub_cache, save_local_dir)

CONFIGS = {"vit": VIT, "resnet": RN, "timm": TIMM_VIT}


class _RunsCode:
    """A pickle payload: unpickling it would run a shell command that leaves a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _assert_refused(path: Path, marker: Path, **kw):
    with pytest.raises(DataError, match="refusing to unpickle .*system"):
        create_encoder(path, **kw) if path.suffix else create_encoder(f"local-dir:{path}")
    assert not marker.exists()  # nothing in the file ran


def _features(encoder, x):
    with torch.no_grad():
        return encoder.eval()(x)


# -- open_clip: local-dir:, hf-hub:, open_clip:<arch> -------------------------------------------------------------

@pytest.mark.parametrize("kind", list(CONFIGS))
def test_local_dir_matches_open_clip_and_round_trips(kind, tmp_path):
    cfg = CONFIGS[kind]
    folder = save_local_dir(open_clip_model(cfg), cfg, tmp_path / "oc")
    enc = create_encoder(f"local-dir:{folder}")
    reference = open_clip.create_model(f"local-dir:{folder}").eval()
    assert isinstance(enc, OpenCLIPEncoder) and enc.kind == kind and enc.mean == OPENAI_MEAN
    x = pixels(enc.image_size)
    out = _features(enc, x)
    with torch.no_grad():
        expected = reference.encode_image(x)
    gh, gw = enc.grid_size
    assert out["grid"].shape == (2, gh * gw, cfg["embed_dim"]) and enc.feature_dim == cfg["embed_dim"]
    torch.testing.assert_close(out["pooled"], expected, atol=1e-5, rtol=1e-5)
    # the text side stays reachable, and equals open_clip's
    text = enc.text_tower()
    tokens = open_clip.get_tokenizer(f"local-dir:{folder}")(["a chest x-ray"])
    with torch.no_grad():
        torch.testing.assert_close(text.encode(["a chest x-ray"]), reference.encode_text(tokens), atol=1e-5, rtol=0)
    # our folder reproduces the features bit for bit, offline, without the text side
    again = create_encoder(enc.save_pretrained(tmp_path / "ours"))
    assert again.fingerprint() == enc.fingerprint() and again.config == enc.config
    reloaded = _features(again, x)
    assert torch.equal(reloaded["grid"], out["grid"]) and torch.equal(reloaded["pooled"], out["pooled"])
    with pytest.raises(DataError, match="image tower only"):
        again.text_tower()


def test_vit_grid_is_the_projected_final_norm_patch_tokens(tmp_path):
    folder = save_local_dir(open_clip_model(VIT), VIT, tmp_path / "oc")
    enc = create_encoder(f"local-dir:{folder}").eval()
    x = pixels(enc.image_size, batch=1)
    v = enc.visual
    with torch.no_grad():
        tokens = v.transformer(v._embeds(x))
        expected = v.ln_post(tokens)[:, 1:] @ v.proj  # patch tokens after ln_post, CLS dropped, projected
        torch.testing.assert_close(enc(x)["grid"], expected, atol=1e-6, rtol=0)


def test_resnet_grid_is_the_attention_pool_value_path(tmp_path):
    folder = save_local_dir(open_clip_model(RN), RN, tmp_path / "oc")
    enc = create_encoder(f"local-dir:{folder}").eval()
    v = enc.visual
    x = pixels(enc.image_size, batch=1)
    with torch.no_grad():
        fmap = v.layer4(v.layer3(v.layer2(v.layer1(v.stem(x)))))
        tokens = fmap.flatten(2).transpose(1, 2) + v.attnpool.positional_embedding[1:]
        expected = v.attnpool.c_proj(v.attnpool.v_proj(tokens))
        torch.testing.assert_close(enc(x)["grid"], expected, atol=1e-6, rtol=0)
    assert enc.grid_size == (2, 2)


def test_biomedclip_layout_with_a_hugging_face_text_tower(tmp_path):
    """BiomedCLIP's config: timm ViT trunk + an HF BERT text tower (CustomTextCLIP); its text side builds
    from a local BERT config here. When the text model is out of reach (offline, not cached), the image
    tower still loads alone, with the same features."""
    import json

    from transformers import BertConfig

    BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=64).save_pretrained(tmp_path / "bert")
    text = {"hf_model_name": str(tmp_path / "bert"), "hf_tokenizer_name": str(tmp_path / "bert"),
            "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 16,
            "hf_model_pretrained": False}
    cfg = {"embed_dim": 32, "vision_cfg": TIMM_VIT["vision_cfg"], "text_cfg": text}
    folder = save_local_dir(open_clip_model(dict(cfg, custom_text=True)), cfg, tmp_path / "oc")
    enc = create_encoder(f"local-dir:{folder}")
    assert isinstance(enc.text_tower().model, open_clip.CustomTextCLIP)
    x = pixels(224, batch=1)
    with torch.no_grad():
        reference = open_clip.create_model(f"local-dir:{folder}").eval().encode_image(x)
        torch.testing.assert_close(_features(enc, x)["pooled"], reference, atol=1e-5, rtol=1e-5)
    config = json.loads((folder / "open_clip_config.json").read_text())
    config["model_cfg"]["text_cfg"]["hf_model_name"] = "medvqa-test/unreachable-bert"
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    alone = create_encoder(f"local-dir:{folder}")
    assert torch.equal(_features(alone, x)["pooled"], _features(enc, x)["pooled"])
    with pytest.raises(DataError, match="no text tower"):
        alone.text_tower()


def test_hf_hub_from_a_populated_cache_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        pytest.skip("needs HF_HUB_OFFLINE=1")
    repo = "medvqa-test/tiny-biomedclip-layout"
    populate_hub_cache(tmp_path / "hub", repo, save_local_dir(open_clip_model(TIMM_VIT), TIMM_VIT, tmp_path / "oc"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    enc = create_encoder(f"hf-hub:{repo}")
    assert enc.config.source == f"hf-hub:{repo}" and enc.grid_size == (14, 14)
    reference = open_clip.create_model(f"hf-hub:{repo}").eval()
    x = pixels(224, batch=1)
    with torch.no_grad():
        torch.testing.assert_close(_features(enc, x)["pooled"], reference.encode_image(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(OSError, match="medvqa-test/not-cached.*no network"):
        create_encoder("hf-hub:medvqa-test/not-cached")


def test_open_clip_arch_with_a_weights_file_and_random_init(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "medvqa-tiny-vit.json").write_text(__import__("json").dumps(VIT))
    open_clip.add_model_config(tmp_path / "configs")  # open_clip's own way to add an architecture
    model = open_clip_model(VIT)
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    enc = create_encoder("open_clip:medvqa-tiny-vit", pretrained=tmp_path / "w.safetensors")
    x = pixels(32)
    with torch.no_grad():
        torch.testing.assert_close(_features(enc, x)["pooled"], model.encode_image(x), atol=1e-5, rtol=1e-5)
    torch.manual_seed(0)  # the seed the file's model was initialised with: the same weights, so the same key
    assert create_encoder("open_clip:medvqa-tiny-vit").fingerprint() == enc.fingerprint()
    torch.manual_seed(1)
    assert create_encoder("open_clip:medvqa-tiny-vit").fingerprint() != enc.fingerprint()
    with pytest.raises(ValueError, match="neither a known tag"):
        create_encoder("open_clip:medvqa-tiny-vit", pretrained="no-such-tag")
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        create_encoder("open_clip:ViT-B-33")


def test_local_dir_pickle_weights_load_and_code_is_refused(tmp_path):
    model = open_clip_model(VIT)
    folder = save_local_dir(model, VIT, tmp_path / "bin", safetensors=False)
    x = pixels(32)
    with torch.no_grad():
        torch.testing.assert_close(_features(create_encoder(f"local-dir:{folder}"), x)["pooled"],
                                   model.encode_image(x), atol=1e-5, rtol=1e-5)
    marker = tmp_path / "pwned"
    torch.save({**model.state_dict(), "extra": _RunsCode(marker)}, folder / "open_clip_pytorch_model.bin")
    _assert_refused(folder, marker)


@pytest.mark.parametrize("edit,message", [
    (lambda text: text[:-5], r"open_clip_config.json: line \d+: invalid JSON"),
    (lambda text: text.replace('"model_cfg"', '"model"'), "no 'model_cfg'"),
    (lambda text: json.dumps({**json.loads(text), "preprocess_cfg": {"mean": [0.5, 0.5]}}),
     r"preprocess_cfg: 'mean' is \[0.5, 0.5\]; expected three numbers"),
    (lambda text: json.dumps({**json.loads(text), "preprocess_cfg": {"std": [0.2, 0.0, 0.2]}}),
     "'std' is .*must be positive"),
])
def test_local_dir_bad_config_names_the_file_and_field(edit, message, tmp_path):
    folder = save_local_dir(open_clip_model(VIT), VIT, tmp_path / "oc")
    config = folder / "open_clip_config.json"
    config.write_text(edit(config.read_text()))
    with pytest.raises(DataError, match=message):
        create_encoder(f"local-dir:{folder}")


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_grad_checkpointing_of_open_clip_towers(kind, tmp_path):
    from .test_encoders import _assert_checkpointing_keeps_less_for_the_same_gradients

    cfg = CONFIGS[kind]
    enc = create_encoder(f"local-dir:{save_local_dir(open_clip_model(cfg), cfg, tmp_path / 'oc')}").train()
    if kind == "resnet":  # open_clip's ModifiedResNet takes the call and does nothing: refused, not ignored
        with pytest.raises(DataError, match="ModifiedResNet .* has no gradient checkpointing"):
            enc.freeze_norm_().set_grad_checkpointing()
        return
    _assert_checkpointing_keeps_less_for_the_same_gradients(enc, pixels(enc.image_size), at_most=0.6)


# -- OpenAI's state-dict format (PubMedCLIP) and TorchScript archives ---------------------------------------------

@pytest.mark.parametrize("kind", ["vit", "resnet"])
def test_openai_format_file_infers_the_architecture(kind, tmp_path):
    import numpy as np

    cfg = CONFIGS[kind]
    model = open_clip_model(cfg)
    state = openai_state_dict(model)
    assert openai_model_cfg(state) == cfg  # what OpenAI's build_model infers, as open_clip's config
    # PubMedCLIP's layout: the (fp16, on a GPU) CLIP state dict nested with training bookkeeping
    path = tmp_path / "PubMedCLIP_tiny.pth"
    torch.save({"best_epoch": 7, "state_dict": {k: v.half() for k, v in state.items()},
                "optimizer_state_dict": torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))]).state_dict(),
                "best_loss": np.float64(1.25)}, path)
    enc = create_encoder(path)
    model.load_state_dict({k: v.half().float() for k, v in state.items()})  # the same rounded weights
    x = pixels(enc.image_size)
    with torch.no_grad():
        torch.testing.assert_close(_features(enc, x)["pooled"], model.encode_image(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(enc.text_tower().encode(["x"]), model.encode_text(
            open_clip.SimpleTokenizer(context_length=16)(["x"])), atol=1e-5, rtol=0)
    again = create_encoder(enc.save_pretrained(tmp_path / "ours"))
    assert torch.equal(_features(again, x)["grid"], _features(enc, x)["grid"])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 warns on numpy.core, as the file asks for it
def test_checkpoints_written_under_numpy_1_load_their_numpy_scalars(tmp_path):
    """numpy 1 pickled its scalars as numpy.core.multiarray.scalar (numpy 2: numpy._core); legacy (non-zip) files
    name one refused global per try."""
    import zipfile

    import numpy as np

    from encoders._weights import read_torch_file

    checkpoint = {"state_dict": {"w": torch.ones(2)}, "best_loss": np.float64(1.25), "dtype": np.dtype("float32")}
    torch.save(checkpoint, tmp_path / "new.pt")
    with zipfile.ZipFile(tmp_path / "new.pt") as z:
        members = [(info, z.read(info.filename)) for info in z.infolist()]
    with zipfile.ZipFile(tmp_path / "numpy1.pt", "w", zipfile.ZIP_STORED) as z:
        for info, data in members:
            z.writestr(info, data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    torch.save(checkpoint, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    for name in ("numpy1.pt", "legacy.pt"):
        loaded = read_torch_file(tmp_path / name)
        assert loaded["best_loss"] == 1.25 and loaded["dtype"] == np.float32 and torch.equal(loaded["state_dict"]["w"],
                                                                                              torch.ones(2)), name


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_openai_torchscript_archive_is_read_without_running_it(tmp_path):
    model = open_clip_model(RN)
    # OpenAI's archives keep 3 int tensors beside the weights (input_resolution, context_length, vocab_size; open_clip's
    # model has the last two as plain ints already)
    model.register_buffer("input_resolution", torch.tensor(64))
    torch.jit.script(model).save(str(tmp_path / "RN-tiny.pt"))  # OpenAI ships its CLIPs as TorchScript
    from encoders._weights import read_torchscript_tensors

    assert "input_resolution" in read_torchscript_tensors(tmp_path / "RN-tiny.pt")
    enc = create_encoder(tmp_path / "RN-tiny.pt")
    x = pixels(enc.image_size)
    with torch.no_grad():
        torch.testing.assert_close(_features(enc, x)["pooled"], model.encode_image(x), atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_torchscript_archive_with_code_in_its_pickle_is_refused(tmp_path):
    import pickle
    import zipfile

    torch.jit.script(open_clip_model(VIT)).save(str(tmp_path / "ok.pt"))
    marker = tmp_path / "pwned"
    with zipfile.ZipFile(tmp_path / "ok.pt") as src, zipfile.ZipFile(tmp_path / "evil.pt", "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(item, pickle.dumps(_RunsCode(marker), protocol=2) if item.filename.endswith("/data.pkl")
                         else data)
    with pytest.raises(DataError, match="refers to '(posix|nt).system'"):
        create_encoder(tmp_path / "evil.pt")
    assert not marker.exists()


def test_openai_format_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    state = openai_state_dict(open_clip_model(VIT))
    torch.save({"state_dict": state, "best_loss": _RunsCode(marker)}, tmp_path / "evil.pth")
    _assert_refused(tmp_path / "evil.pth", marker)
    torch.save({k: v for k, v in list(state.items())[:3]}, tmp_path / "partial.pth")
    with pytest.raises(DataError, match="not a weights layout"):
        create_encoder(tmp_path / "partial.pth")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        create_encoder("missing.pt")


@pytest.mark.parametrize("arch,n_keys", [("ViT-B-32", 302), ("RN50", None), ("RN50x4", None)])
def test_full_size_openai_layouts(arch, n_keys):
    """PubMedCLIP's three towers at full size, on the meta device (no memory, no forward): open_clip's CLIP has
    OpenAI's tensor names, and the inference recovers the architecture from them."""
    builtin = open_clip.get_model_config(arch)
    with torch.device("meta"):
        state = open_clip.CLIP(**builtin).state_dict()
    for key in ("visual.conv1.weight", "token_embedding.weight", "positional_embedding", "text_projection",
                "logit_scale", "ln_final.weight", "transformer.resblocks.11.mlp.c_proj.weight"):
        assert key in state
    if n_keys:
        assert len(state) == n_keys  # OpenAI's ViT-B/32 state dict (without its 3 int entries)
    cfg = openai_model_cfg(state)
    assert cfg["embed_dim"] == builtin["embed_dim"]
    for field in ("image_size", "layers", "width") + (("patch_size",) if arch.startswith("ViT") else ()):
        assert cfg["vision_cfg"][field] == builtin["vision_cfg"][field], field
    for field in ("context_length", "vocab_size", "width", "heads", "layers"):
        assert cfg["text_cfg"][field] == builtin["text_cfg"][field], field


# -- PMC-CLIP ------------------------------------------------------------------------------------------------------

PMC_TINY = {"embed_dim": 768, "vision_cfg": {"image_size": 64, "layers": [1, 2, 1, 1], "width": 16, "head_width": 64}}


def _pmc_checkpoint(tmp_path: Path, seed: int = 0) -> tuple[Path, dict]:
    """PMC-CLIP's training checkpoint layout (training/main.py): epoch, name, a DDP state_dict, optimizer."""
    from encoders.open_clip_tower import build_visual

    torch.manual_seed(seed)
    visual = build_visual(PMC_TINY)
    wrapper = torch.nn.Module()
    wrapper.visual = visual
    from ._released import _perturb_batchnorm

    _perturb_batchnorm(wrapper)
    image = {f"visual.{k}": v.clone() for k, v in visual.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    text = {"text_encoder.embeddings.word_embeddings.weight": torch.randn(50, 8, generator=g),
            "text_encoder.encoder.layer.0.attention.self.query.weight": torch.randn(8, 8, generator=g),
            "positional_embedding": torch.randn(77, 8, generator=g), "ln_final.weight": torch.ones(8),
            "ln_final.bias": torch.zeros(8), "text_projection": torch.randn(8, 768, generator=g),
            "mlm_projection": torch.randn(8, 50, generator=g), "logit_scale": torch.tensor(2.6),
            "img_special_token": torch.zeros(1, 1, 768),
            "fusion_module.resblocks.0.attn.in_proj_weight": torch.randn(24, 8, generator=g)}
    params = [torch.nn.Parameter(v.clone()) for v in image.values() if v.is_floating_point()]
    optimizer = torch.optim.AdamW(params[:3], lr=1e-4)
    params[0].grad = torch.ones_like(params[0])
    optimizer.step()
    checkpoint = {"epoch": 100, "name": "2023_01_01-model_RN50_fusion4",
                  "state_dict": {f"module.{k}": v for k, v in {**image, **text}.items()},
                  "optimizer": optimizer.state_dict()}
    path = tmp_path / "checkpoint.pt"
    torch.save(checkpoint, path)
    return path, {k[len("visual."):]: v for k, v in image.items()}


def _pmc_reference(w: dict, x: torch.Tensor, heads: int) -> torch.Tensor:
    """PMC-CLIP's ModifiedResNet + AttentionPool2d (its model/blocks.py), written out with functional ops."""
    def bn(t, p):
        return F.batch_norm(t, w[f"{p}.running_mean"], w[f"{p}.running_var"], w[f"{p}.weight"], w[f"{p}.bias"])

    x = F.relu(bn(F.conv2d(x, w["conv1.weight"], stride=2, padding=1), "bn1"))
    x = F.relu(bn(F.conv2d(x, w["conv2.weight"], padding=1), "bn2"))
    x = F.avg_pool2d(F.relu(bn(F.conv2d(x, w["conv3.weight"], padding=1), "bn3")), 2)
    for layer in range(1, 5):
        blocks = sorted({int(k.split(".")[1]) for k in w if k.startswith(f"layer{layer}.")})
        for b in blocks:
            p, stride = f"layer{layer}.{b}", 2 if layer > 1 and b == 0 else 1
            out = F.relu(bn(F.conv2d(x, w[f"{p}.conv1.weight"]), f"{p}.bn1"))
            out = F.relu(bn(F.conv2d(out, w[f"{p}.conv2.weight"], padding=1), f"{p}.bn2"))
            out = F.avg_pool2d(out, stride) if stride > 1 else out  # anti-aliased stride
            out = bn(F.conv2d(out, w[f"{p}.conv3.weight"]), f"{p}.bn3")
            if f"{p}.downsample.0.weight" in w:
                identity = F.avg_pool2d(x, stride) if stride > 1 else x
                identity = bn(F.conv2d(identity, w[f"{p}.downsample.0.weight"]), f"{p}.downsample.1")
            else:
                identity = x
            x = F.relu(out + identity)
    tokens = x.flatten(2).transpose(1, 2)  # (B, HW, C)
    tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], 1) + w["attnpool.positional_embedding"]
    q = F.linear(tokens[:, :1], w["attnpool.q_proj.weight"], w["attnpool.q_proj.bias"])
    k = F.linear(tokens, w["attnpool.k_proj.weight"], w["attnpool.k_proj.bias"])
    v = F.linear(tokens, w["attnpool.v_proj.weight"], w["attnpool.v_proj.bias"])
    B, L, C = k.shape
    split = lambda t: t.reshape(B, t.shape[1], heads, C // heads).transpose(1, 2)  # noqa: E731
    attn = (split(q) @ split(k).transpose(-1, -2) / (C // heads) ** 0.5).softmax(-1)
    pooled = (attn @ split(v)).transpose(1, 2).reshape(B, C)
    return F.linear(pooled, w["attnpool.c_proj.weight"], w["attnpool.c_proj.bias"])


def test_pmc_clip_checkpoint_and_extracted_image_encoder(tmp_path):
    path, weights = _pmc_checkpoint(tmp_path)
    enc = create_encoder(path)
    assert enc.kind == "resnet" and enc.feature_dim == 768 and enc.grid_size == (2, 2) and enc.mean == OPENAI_MEAN
    x = pixels(64)
    out = _features(enc, x)
    heads = 16 * 32 // 64  # PMC-CLIP's rule: width * 32 // head_width (64)
    with torch.no_grad():
        torch.testing.assert_close(out["pooled"], _pmc_reference(weights, x, heads), atol=1e-5, rtol=1e-5)
    assert out["grid"].shape == (2, 4, 768)
    # the published image encoder: the bare ModifiedResNet state dict
    torch.save(weights, tmp_path / "image_encoder(resnet50).pth")
    bare = create_encoder(tmp_path / "image_encoder(resnet50).pth")
    assert torch.equal(_features(bare, x)["pooled"], out["pooled"]) and bare.fingerprint() == enc.fingerprint()
    eight = create_encoder(tmp_path / "image_encoder(resnet50).pth", heads=8)  # as notebooks rebuild it
    with torch.no_grad():
        torch.testing.assert_close(_features(eight, x)["pooled"], _pmc_reference(weights, x, 8), atol=1e-5, rtol=1e-5)
    again = create_encoder(enc.save_pretrained(tmp_path / "ours"))
    assert torch.equal(_features(again, x)["grid"], out["grid"])
    with pytest.raises(DataError, match="no text tower"):
        enc.text_tower()


def test_pmc_clip_malicious_checkpoint_is_refused(tmp_path):
    path, _ = _pmc_checkpoint(tmp_path)
    checkpoint = torch.load(path, weights_only=True)
    marker = tmp_path / "pwned"
    checkpoint["name"] = _RunsCode(marker)
    torch.save(checkpoint, path)
    _assert_refused(path, marker)


def test_pmc_clip_full_size_key_layout():
    """RN50_fusion4's image tower at full size (meta device): PMC-CLIP's key names and shapes."""
    from encoders.open_clip_tower import build_visual

    cfg = copy.deepcopy(PMC_TINY)
    cfg["vision_cfg"].update(image_size=224, layers=[3, 4, 6, 3], width=64)
    with torch.device("meta"):
        state = build_visual(cfg).state_dict()
    assert len(state) == 339  # stem 18 + 16 bottlenecks x 18 + 4 downsamples x 6 + attention pool 9
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert shapes["conv1.weight"] == (32, 3, 3, 3) and shapes["attnpool.positional_embedding"] == (50, 2048)
    assert shapes["attnpool.c_proj.weight"] == (768, 2048) and shapes["layer1.0.downsample.0.weight"] == (256, 64, 1, 1)
    assert "layer4.2.bn3.running_var" in shapes and "layer3.5.conv2.weight" in shapes


# -- identity and the feature cache ---------------------------------------------------------------------------------

def test_fingerprints_follow_the_weights(tmp_path):
    path, weights = _pmc_checkpoint(tmp_path)
    assert create_encoder(path).fingerprint() == create_encoder(path).fingerprint()
    changed = dict(weights)
    changed["attnpool.c_proj.bias"] = changed["attnpool.c_proj.bias"] + 1e-3
    torch.save(changed, tmp_path / "changed.pth")
    assert create_encoder(tmp_path / "changed.pth").fingerprint() != create_encoder(path).fingerprint()


def test_feature_cache_with_a_released_encoder(tmp_path):
    from PIL import Image

    folder = save_local_dir(open_clip_model(VIT), VIT, tmp_path / "oc")
    enc = create_encoder(f"local-dir:{folder}").eval()
    images = []
    for i in range(3):
        path = tmp_path / f"img{i}.png"
        Image.new("RGB", (40, 30), (60 * i, 20, 200)).save(path)
        images.append(path)
    cache = FeatureCache.open(tmp_path / "cache", enc)
    hashes = cache.ensure(images, batch_size=2)
    cached = cache.lookup(hashes)
    direct = enc.encode(images)
    torch.testing.assert_close(cached["pooled"], direct["pooled"].float(), atol=0, rtol=0)
    assert cached["grid"].shape == (3, 16, 32)
