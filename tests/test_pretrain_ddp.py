"""DDP: two gloo processes on the CPU agree with one process on the loss and the weights for the same global batch."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pretrain import PretrainConfig, pretrain

from .conftest import spawn_ranks


@pytest.mark.slow
def test_two_processes_match_one_on_the_same_global_batch(phantom_dir, tmp_path):
    # clip-vit-tiny has LayerNorm only (BatchNorm statistics would differ per process); no dropout
    base = PretrainConfig(data=str(phantom_dir / "captions"), epochs=1, lr=1e-3, warmup_epochs=1.0, embed_dim=16,
                          val_split="none", progress=False, encoder="clip-vit-tiny", text="bert-tiny")
    one = asdict(base) | {"batch_size": 16, "out": str(tmp_path / "one")}
    two = asdict(base) | {"batch_size": 8, "out": str(tmp_path / "two")}
    single = pretrain(PretrainConfig(**one))
    spawn_ranks(pretrain, PretrainConfig(**two))
    h1 = single["history"]
    h2 = json.loads((tmp_path / "two" / "history.json").read_text())
    assert h1[0]["loss"] == pytest.approx(h2[0]["loss"], rel=1e-5)
    # the same gradients (before clipping): DDP's averaging is undone by ClipLoss.backward_scale;
    # without it this norm would be half (Adam and clipping would hide that in the weights)
    # and the logit scale's gradient counted once, not once per rank
    assert h1[0]["grad_norm"] == pytest.approx(h2[0]["grad_norm"], rel=1e-4)
    a = load_file(str(tmp_path / "one" / "encoder" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "encoder" / "model.safetensors"))
    for key in a:  # equal up to float noise that Adam amplifies for near-zero gradients (lr = 1e-3)
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=2e-5, msg=key)
    cfg = json.loads((tmp_path / "two" / "run_config.json").read_text())
    assert cfg["batch_size"] == 8
    assert Path(tmp_path / "two" / "checkpoint.pt").is_file()
