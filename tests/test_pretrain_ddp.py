"""DDP: two gloo processes on the CPU agree with one process on the loss and the weights for the same global batch."""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pretrain.train import PretrainConfig, pretrain

from .conftest import free_port


@pytest.fixture(autouse=True)
def _one_thread():
    """Small models: one intra-op thread is as fast here, and immune to the several-fold slowdown that
    OpenMP spin-waits cause when another job shares the 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _worker(rank: int, world: int, port: int, cfg: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    torch.set_num_threads(1)
    pretrain(PretrainConfig(**cfg))


@pytest.mark.slow
def test_two_processes_match_one_on_the_same_global_batch(phantom_dir, tmp_path):
    import torch.multiprocessing as mp

    # clip-vit-tiny has LayerNorm only (BatchNorm statistics would differ per process); no dropout
    base = PretrainConfig(data=str(phantom_dir / "captions"), epochs=1, lr=1e-3, warmup_epochs=1.0, embed_dim=16,
                          val_split="none", progress=False, encoder="clip-vit-tiny", text="bert-tiny")
    one = asdict(base) | {"batch_size": 16, "out": str(tmp_path / "one")}
    two = asdict(base) | {"batch_size": 8, "out": str(tmp_path / "two")}
    single = pretrain(PretrainConfig(**one))
    mp.spawn(_worker, args=(2, free_port(), two), nprocs=2, join=True)
    h1 = single["history"]
    h2 = json.loads((tmp_path / "two" / "history.json").read_text())
    assert h1[0]["loss"] == pytest.approx(h2[0]["loss"], rel=1e-5)
    # the same gradients (before clipping): DDP's averaging is undone by ClipLoss.backward_scale;
    # without it this norm would be half (Adam and clipping would hide that in the weights)
    assert h1[0]["grad_norm"] == pytest.approx(h2[0]["grad_norm"], rel=2e-2)
    a = load_file(str(tmp_path / "one" / "encoder" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "encoder" / "model.safetensors"))
    for key in a:  # equal up to float noise that Adam amplifies for near-zero gradients (lr = 1e-3)
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=2e-5, msg=key)
    cfg = json.loads((tmp_path / "two" / "run_config.json").read_text())
    assert cfg["batch_size"] == 8
    assert Path(tmp_path / "two" / "checkpoint.pt").is_file()
