"""DDP: 2 "nodes" x 2 gloo processes on localhost, launched by torchrun as on a cluster, agree with one process
on the loss, the gradients and the weights for the same global batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pretrain import PretrainConfig, pretrain

from .conftest import free_port

NODES, PROCS, GLOBAL_BATCH = 2, 2, 16


def _torchrun_nodes(args: list[str], tmp_path: Path) -> None:
    """`torchrun --nnodes 2 --nproc-per-node 2 -m vqa.cli ARGS` once per node, as every node of a job runs it:
    static rendezvous at node 0's address (here both nodes are this machine, sharing the run folder)."""
    port = free_port()
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    agents = []
    for node in range(NODES):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={NODES}", f"--nproc-per-node={PROCS}",
               f"--node-rank={node}", "--master-addr=127.0.0.1", f"--master-port={port}",
               "-m", "vqa.cli", *args]
        log = open(tmp_path / f"node{node}.log", "w")
        agents.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    try:
        for agent, _ in agents:
            agent.wait(timeout=600)
    finally:  # an agent that hangs (a rank that never joined) must not outlive the test
        for agent, log in agents:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
            log.close()
    for node, (agent, _) in enumerate(agents):
        assert agent.returncode == 0, (tmp_path / f"node{node}.log").read_text()[-3000:]


@pytest.mark.slow
def test_two_nodes_of_two_processes_match_one_on_the_same_global_batch(phantom_dir, tmp_path):
    # clip-vit-tiny has LayerNorm only (BatchNorm statistics would differ per process); no dropout
    base = PretrainConfig(data=str(phantom_dir / "captions"), epochs=1, lr=1e-3, warmup_epochs=1.0, embed_dim=16,
                          val_split="none", progress=False, encoder="clip-vit-tiny", text="bert-tiny",
                          batch_size=GLOBAL_BATCH, out=str(tmp_path / "one"))
    single = pretrain(base)
    _torchrun_nodes(["pretrain", "--data", base.data, "--epochs", "1", "--lr", "1e-3", "--warmup-epochs", "1",
                     "--embed-dim", "16", "--val-split", "none", "--no-progress", "--encoder", "clip-vit-tiny",
                     "--text", "bert-tiny", "--batch-size", str(GLOBAL_BATCH // (NODES * PROCS)),
                     "--out", str(tmp_path / "four")], tmp_path)
    h1 = single["history"]
    h4 = json.loads((tmp_path / "four" / "history.json").read_text())
    assert h1[0]["loss"] == pytest.approx(h4[0]["loss"], rel=1e-5)
    # the same gradients (before clipping): DDP's averaging is undone by ClipLoss.backward_scale;
    # without it this norm would be a quarter (Adam and clipping would hide that in the weights)
    # and the logit scale's gradient counted once, not once per rank
    assert h1[0]["grad_norm"] == pytest.approx(h4[0]["grad_norm"], rel=1e-4)
    a = load_file(str(tmp_path / "one" / "encoder" / "model.safetensors"))
    b = load_file(str(tmp_path / "four" / "encoder" / "model.safetensors"))
    for key in a:  # equal up to float noise that Adam amplifies for near-zero gradients (lr = 1e-3)
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=2e-5, msg=key)
    cfg = json.loads((tmp_path / "four" / "run_config.json").read_text())
    assert cfg["batch_size"] == GLOBAL_BATCH // (NODES * PROCS)
    assert Path(tmp_path / "four" / "checkpoint.pt").is_file()
    # one world of 4 across the two agents (the second node's ranks are 2 and 3, its local ranks 0 and 1)
    logs = (tmp_path / "node0.log").read_text() + (tmp_path / "node1.log").read_text()
    assert "rank 3/4 joined" in logs and "rank 2/4 joined" in logs
