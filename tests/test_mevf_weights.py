"""MEVF image side: safe unpickling, weight conversion (real released files when present),
agreement with an independent re-statement of MEVF's forward pass, the reconstruction loss."""
from __future__ import annotations

import collections
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from encoders import (AutoencoderReconstructionLoss, UnsafePickleError, convert_mevf_weights, create_encoder,
                      safe_unpickle)
from encoders.mevf_weights import AE_NAMES

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MEVF_DIR = DATA / "mevf"
needs_mevf = pytest.mark.skipif(not (MEVF_DIR / "pretrained_maml.weights").exists(),
                                reason="MEVF's released weights not present")


# -- safe_unpickle ------------------------------------------------------------------------

class _RunsCode:
    def __reduce__(self):
        return os.system, ("echo pwned",)


def test_pickle_with_os_system_is_refused(tmp_path):
    path = tmp_path / "evil.weights"
    path.write_bytes(pickle.dumps({"conv1": _RunsCode()}))
    with pytest.raises(UnsafePickleError) as err:
        safe_unpickle(path)
    assert "evil.weights" in str(err.value) and "system" in str(err.value)


def test_dangerous_builtins_are_refused(tmp_path):
    path = tmp_path / "eval.pkl"
    # GLOBAL builtins.eval, then call it: a classic pickle payload
    path.write_bytes(b"cbuiltins\neval\n(S'1+1'\ntR.")
    with pytest.raises(UnsafePickleError, match="builtins.eval"):
        safe_unpickle(path)


def test_python2_pickles_name_builtins_as_builtin(tmp_path):
    """Python 2's protocol-2 pickles call the module `__builtin__`: its plain data loads, its eval does not."""
    ok, evil = tmp_path / "py2.pkl", tmp_path / "py2-eval.pkl"
    ok.write_bytes(b"\x80\x02}q\x00U\x05wordsq\x01c__builtin__\nset\nq\x02]q\x03(K\x01K\x02e\x85q\x04Rq\x05s.")
    evil.write_bytes(b"\x80\x02c__builtin__\neval\nq\x00U\x031+1q\x01\x85q\x02Rq\x03.")
    assert safe_unpickle(ok, builtins_only=True) == {"words": {1, 2}}
    with pytest.raises(UnsafePickleError, match="__builtin__.eval"):
        safe_unpickle(evil)


def test_plain_data_and_numpy_arrays_load(tmp_path):
    data = collections.OrderedDict(w=np.arange(6, dtype=np.float32).reshape(2, 3), names=["a", "b"], n=(1, 2.5))
    path = tmp_path / "ok.pkl"
    path.write_bytes(pickle.dumps(data, protocol=3))
    loaded = safe_unpickle(path)
    assert isinstance(loaded, collections.OrderedDict) and loaded["names"] == ["a", "b"]
    np.testing.assert_array_equal(loaded["w"], data["w"])


def test_not_a_pickle_names_the_file(tmp_path):
    path = tmp_path / "junk.weights"
    path.write_bytes(b"\x80\x03}q\x00(X")  # truncated
    with pytest.raises(ValueError, match="junk.weights"):
        safe_unpickle(path)


# -- conversion on a synthetic MEVF folder (always runs) -----------------------------------

def _fake_mevf_folder(folder: Path) -> dict:
    """Write files laid out like MEVF's releases, from random tensors."""
    g = torch.Generator().manual_seed(1)
    maml = {}
    for i in range(4):
        c_in = 1 if i == 0 else 64
        maml[f"conv{i + 1}"] = torch.randn(3, 3, c_in, 64, generator=g).numpy() * 0.1  # TensorFlow layout
        maml[f"b{i + 1}"] = torch.randn(64, generator=g).numpy() * 0.01
    (folder / "pretrained_maml.weights").write_bytes(pickle.dumps(maml, protocol=3))
    torch.manual_seed(2)
    ae = {f"{old}.{p}": t for old, new in AE_NAMES.items()
          for p, t in getattr(create_encoder("mevf").autoencoder, new).state_dict().items()}
    torch.save(collections.OrderedDict(ae), folder / "pretrained_ae.pth")
    return {"maml": maml, "ae": ae}


def _reference_mevf(maml: dict, ae: dict, proj_w, proj_b, pixels: torch.Tensor):
    """MEVF's image forward written out with functional ops straight from the released tensors."""
    x84 = F.interpolate(pixels, size=(84, 84), mode="bilinear", align_corners=False, antialias=True)
    h = x84
    for i in range(1, 5):
        w = torch.from_numpy(np.ascontiguousarray(maml[f"conv{i}"].transpose(3, 2, 0, 1)))
        h = F.relu(F.conv2d(h, w, torch.from_numpy(maml[f"b{i}"]), stride=2, padding=1))
        h = h / math.sqrt(1.0 + 1e-5)  # a fresh BatchNorm in eval mode
    maml_feat = h.reshape(-1, 64, 36).mean(2)
    e = F.max_pool2d(F.relu(F.conv2d(pixels, ae["conv1.weight"], ae["conv1.bias"], padding=1)), 2)
    e = F.max_pool2d(F.relu(F.conv2d(e, ae["conv2.weight"], ae["conv2.bias"], padding=1)), 2)
    e = F.relu(F.conv2d(e, ae["conv3.weight"], ae["conv3.bias"], padding=1))
    d = F.relu(F.conv_transpose2d(e, ae["tran_conv1.weight"], ae["tran_conv1.bias"], 2, 1, 1))
    d = F.relu(F.conv2d(d, ae["conv4.weight"], ae["conv4.bias"], padding=1))
    d = F.relu(F.conv_transpose2d(d, ae["tran_conv2.weight"], ae["tran_conv2.bias"], 2, 1, 1))
    d = torch.sigmoid(F.conv2d(d, ae["conv5.weight"], ae["conv5.bias"], padding=1))
    ae_feat = F.linear(e.reshape(e.shape[0], -1), proj_w, proj_b)
    return torch.cat([maml_feat, ae_feat], 1), d


def _check_against_reference(encoder, maml, ae, pixels):
    encoder.eval()
    with torch.no_grad():
        out = encoder(pixels)
        ref_feat, ref_recon = _reference_mevf(maml, ae, encoder.ae_proj.weight, encoder.ae_proj.bias, pixels)
    assert torch.isfinite(out["pooled"]).all()
    assert torch.allclose(out["pooled"], ref_feat, atol=1e-4, rtol=1e-4)
    assert torch.allclose(out["grid"][:, 0], ref_feat, atol=1e-4, rtol=1e-4)
    assert torch.allclose(out["reconstruction"], ref_recon, atol=1e-5)


def test_conversion_of_synthetic_release_matches_reference(tmp_path):
    raw = _fake_mevf_folder(tmp_path)
    state = convert_mevf_weights(tmp_path)
    encoder = create_encoder("mevf")
    encoder.load_state_dict(state, strict=True)
    assert state.keys() == encoder.state_dict().keys()
    pixels = torch.rand(2, 1, 128, 128, generator=torch.Generator().manual_seed(0))
    _check_against_reference(encoder, raw["maml"], raw["ae"], pixels)
    # deterministic: the unreleased projection comes from a fixed seed
    assert torch.equal(convert_mevf_weights(tmp_path)["ae_proj.weight"], state["ae_proj.weight"])
    via_factory = create_encoder("mevf", pretrained=tmp_path)
    assert via_factory.fingerprint() == encoder.fingerprint()


def test_trained_mevf_checkpoint_overrides_image_weights(tmp_path):
    _fake_mevf_folder(tmp_path)
    torch.manual_seed(3)
    trained = create_encoder("mevf")
    ours = trained.state_dict()
    model_state = {"convert.weight": ours["ae_proj.weight"], "convert.bias": ours["ae_proj.bias"],
                   "classifier.main.0.weight": torch.zeros(2, 2)}  # non-image keys are ignored
    for old, new in AE_NAMES.items():
        for p in ("weight", "bias"):
            model_state[f"ae_v_emb.{old}.{p}"] = ours[f"autoencoder.{new}.{p}"]
    for i in range(4):
        for p in ("weight", "bias"):
            model_state[f"maml_v_emb.conv{i + 1}.{p}"] = ours[f"maml.layers.{i}.conv.{p}"]
        for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            model_state[f"maml_v_emb.conv{i + 1}_bn.{p}"] = ours[f"maml.layers.{i}.norm.{p}"]
    torch.save({"model_state": model_state, "epoch": 19}, tmp_path / "model_epoch19.pth")
    state = convert_mevf_weights(tmp_path, checkpoint=tmp_path / "model_epoch19.pth")
    assert all(torch.equal(state[k], v) for k, v in ours.items())
    (tmp_path / "cut.pth").write_bytes((tmp_path / "model_epoch19.pth").read_bytes()[:200])  # a download cut short
    with pytest.raises(ValueError, match=r"cut\.pth: not a readable torch checkpoint"):
        convert_mevf_weights(tmp_path, checkpoint=tmp_path / "cut.pth")


def test_autoencoder_trains_with_mevfs_gradients(tmp_path):
    """Fine-tuning: the autoencoder's layers (ReLU and pooling reordered, ReLUs in place) get the gradients of
    MEVF's own order of operations, through the features and the reconstruction alike."""
    raw = _fake_mevf_folder(tmp_path)
    encoder = create_encoder("mevf", pretrained=tmp_path).eval()
    own = {f"{old}.{p}": param for old, new in AE_NAMES.items()
           for p, param in getattr(encoder.autoencoder, new).named_parameters()}
    pixels = torch.rand(3, 1, 128, 128, generator=torch.Generator().manual_seed(0))
    target = torch.rand(3, 128, generator=torch.Generator().manual_seed(1))

    def gradients(features, recon):
        ((features - target).square().mean() + (recon - pixels).square().mean()).backward()
        grads = {k: p.grad.clone() for k, p in own.items()}
        encoder.zero_grad(set_to_none=True)
        return grads

    out = encoder(pixels)
    ours = gradients(out["pooled"], out["reconstruction"])
    theirs = gradients(*_reference_mevf(raw["maml"], own, encoder.ae_proj.weight, encoder.ae_proj.bias, pixels))
    for name, grad in theirs.items():
        assert grad.abs().sum() > 0, name
        assert torch.allclose(ours[name], grad, rtol=1e-4, atol=1e-7), name


def test_pretrained_true_explains_where_weights_are():
    with pytest.raises(ValueError, match="pretrained_maml.weights"):
        create_encoder("mevf", pretrained=True)


def test_reconstruction_loss_is_mse():
    loss = AutoencoderReconstructionLoss(weight=0.001)
    recon, pixels = torch.full((2, 1, 8, 8), 0.5), torch.zeros(2, 1, 8, 8)
    assert torch.isclose(loss(recon, pixels), torch.tensor(0.001 * 0.25))
    assert loss(recon, torch.zeros(2, 1, 16, 16)).shape == ()  # target resized to the reconstruction


# -- MEVF's real released files --------------------------------------------------------------

@needs_mevf
def test_released_weights_convert_and_reproduce_mevf():
    maml = safe_unpickle(MEVF_DIR / "pretrained_maml.weights")
    assert sorted(maml) == sorted([f"conv{i}" for i in range(1, 5)] + [f"b{i}" for i in range(1, 5)])
    ae = torch.load(MEVF_DIR / "pretrained_ae.pth", map_location="cpu", weights_only=True)
    encoder = create_encoder("mevf")
    encoder.load_state_dict(convert_mevf_weights(MEVF_DIR), strict=True)
    pixels = torch.rand(2, 1, 128, 128, generator=torch.Generator().manual_seed(0))
    _check_against_reference(encoder, maml, ae, pixels)


@needs_mevf
def test_released_autoencoder_reconstructs_radiology_images():
    images = sorted((DATA / "vqa-rad" / "images").glob("*.jpg"))[:4]
    if not images:
        pytest.skip("VQA-RAD images not present")
    pretrained = create_encoder("mevf", pretrained=MEVF_DIR).eval()
    torch.manual_seed(0)
    scratch = create_encoder("mevf").eval()
    pixels = pretrained.preprocess(images)
    loss = AutoencoderReconstructionLoss()
    with torch.no_grad():
        good = loss(pretrained(pixels)["reconstruction"], pixels).item()
        bad = loss(scratch(pixels)["reconstruction"], pixels).item()
    assert good < 0.01 < bad  # measured: ~0.001 vs ~0.075; a wrong mapping would not reconstruct
