"""Tiny replicas of released CLIP checkpoints, each written in its source's exact on-disk format (offline)."""
from __future__ import annotations

import copy
from pathlib import Path

import torch

TEXT = {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1}
# open_clip model configs, shrunk: widths that are multiples of 64 so OpenAI's 64-wide heads infer back
VIT = {"embed_dim": 32, "quick_gelu": True, "text_cfg": TEXT,
       "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 64}}
RN = {"embed_dim": 32, "quick_gelu": True, "text_cfg": TEXT,
      "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 64}}
TIMM_VIT = {"embed_dim": 32, "text_cfg": TEXT,  # BiomedCLIP's layout (a timm ViT trunk + linear proj), tiny trunk
            "vision_cfg": {"timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False,
                           "timm_pool": "", "timm_proj": "linear", "image_size": 224}}
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def open_clip_model(cfg: dict, seed: int = 0):
    """open_clip's own CLIP built from `cfg` with random weights (its constructors, no download)."""
    import dataclasses

    import open_clip
    from open_clip.model import set_model_preprocess_cfg
    from open_clip.transform import PreprocessCfg

    torch.manual_seed(seed)
    cfg = copy.deepcopy(cfg)
    model = (open_clip.CustomTextCLIP if cfg.pop("custom_text", False) else open_clip.CLIP)(**cfg)
    _perturb_batchnorm(model)
    set_model_preprocess_cfg(model, dataclasses.asdict(PreprocessCfg()))  # OpenAI mean/std, as create_model sets
    return model.eval()


def _perturb_batchnorm(model) -> None:
    """Fresh BatchNorms are the identity; give them statistics so a wrong mapping would show."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def save_local_dir(model, cfg: dict, folder: Path, safetensors: bool = True) -> Path:
    """What open_clip's save_for_hf writes: open_clip_config.json {model_cfg, preprocess_cfg} + weights."""
    from open_clip.push_to_hf_hub import save_config_for_hf
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if safetensors:
        save_file(state, str(folder / "open_clip_model.safetensors"))
    else:
        torch.save(state, folder / "open_clip_pytorch_model.bin")
    save_config_for_hf(model, folder / "open_clip_config.json", model_config=cfg)
    return folder


def populate_hub_cache(cache: Path, repo_id: str, folder: Path, commit: str = "0" * 40) -> None:
    """Lay `folder` out as huggingface_hub's cache does for a downloaded model repo."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in folder.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def openai_state_dict(model) -> dict:
    """OpenAI's CLIP state-dict format: open_clip's CLIP uses OpenAI's names (checked in the tests)."""
    return {k: v.clone() for k, v in model.state_dict().items()}


def pixels(size: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))

