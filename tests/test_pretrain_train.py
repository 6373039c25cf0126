"""`medvqa pretrain` end to end on phantom captions: learning, resume, outputs, MLM, frozen text, bad input."""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from encoders import create_encoder
from pretrain.model import load_clip_model
from pretrain import PretrainConfig, pretrain
from pretrain.data import load_captions
from pretrain.train import build_model
from vqa.cli.pretrain import main
from vqa.errors import DataError
from vqa.training import seed_everything


def _cfg(phantom_dir: Path, out: Path, **kw) -> PretrainConfig:
    base = dict(data=str(phantom_dir / "captions"), out=str(out), epochs=2, batch_size=16, lr=2e-3,
                warmup_epochs=0.5, progress=False, embed_dim=32)
    return PretrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def learning_phantom(tmp_path_factory) -> Path:
    from vqa.phantom import generate_phantom

    out = tmp_path_factory.mktemp("pretrain-phantom") / "p"
    generate_phantom(out, n_images=240, seed=1, workers=0)
    return out


@pytest.mark.slow
def test_pretraining_lifts_retrieval_far_above_the_untrained_model(learning_phantom, tmp_path):
    # 168 training pairs, 48 held-out test pairs (chance R@10 = 10/48 = 21 %)
    cfg = _cfg(learning_phantom, tmp_path / "run", val_split="test", epochs=6, batch_size=16, lr=1e-3)
    metrics = pretrain(cfg)
    before, after = metrics["before"]["retrieval"], metrics["after"]["retrieval"]
    assert before["i2t_r10"] < 40 and after["i2t_r10"] > before["i2t_r10"] + 30, (before, after)
    assert after["t2i_r10"] > before["t2i_r10"] + 20
    assert after["mean_recall"] > 2 * before["mean_recall"]
    zs = metrics["after"]["zero_shot"]
    assert set(zs) == {"modality", "plane", "region", "abnormal"}
    assert zs["modality"]["accuracy"] > zs["modality"]["majority"]
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert len(history) == 6 and history[-1]["loss"] < history[0]["loss"]
    assert (tmp_path / "run" / "history.csv").read_text().startswith("epoch,loss")
    saved = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert saved["epochs"] == 6 and saved["batch_size"] == 16


def test_outputs_load_and_match_the_trained_towers(phantom_dir, tmp_path):
    cfg = _cfg(phantom_dir, tmp_path / "run", epochs=1)
    pretrain(cfg)
    out = tmp_path / "run"
    assert {"encoder", "clip", "metrics.json", "history.json", "run_config.json", "checkpoint.pt"} <= \
        {p.name for p in out.iterdir()}
    full = load_clip_model(out / "clip").eval()
    encoder = create_encoder(out / "encoder").eval()
    pixels = torch.randn(2, 3, encoder.image_size, encoder.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = encoder(pixels), full.image_encoder(pixels)
    torch.testing.assert_close(a["grid"], b["grid"])
    torch.testing.assert_close(a["pooled"], b["pooled"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["before"]["retrieval"]["n"] == metrics["after"]["retrieval"]["n"] > 0
    assert metrics["numerics"]["precision"] == cfg.precision and metrics["numerics"]["torch"] == torch.__version__
    for p in (out / "encoder").iterdir():  # weights only as safetensors
        assert p.suffix in (".json", ".safetensors")
    from vqa.cli.pretrain_eval import main as evaluate_main

    evaluate_main(["--model", str(out / "clip"), "--data", cfg.data, "--split", "test", "--shuffle-captions",
                   "--out", str(tmp_path / "control.json")])
    control = json.loads((tmp_path / "control.json").read_text())
    assert control["protocol"]["shuffled_captions"] and control["retrieval"]["n"] == 12


def test_linear_probe_on_phantom_ground_truth(phantom_dir):
    from pretrain.probe import linear_probe, table

    torch.manual_seed(0)
    results = linear_probe(create_encoder("clip-vit-tiny"), phantom_dir, fields=("modality", "abnormal"))
    assert set(results["pooled"]) == set(results["grid"]) == {"modality", "abnormal"}
    assert results["n_test"] == 12 and 0 <= results["grid"]["modality"] <= 100
    assert "| modality |" in table({"untrained": results})


@pytest.mark.slow
def test_both_clip_towers_give_a_transformers_clip_folder(phantom_dir, tmp_path):
    from transformers import CLIPModel

    pretrain(_cfg(phantom_dir, tmp_path / "run", epochs=1, text="clip-text-tiny", val_split="none"))
    clip = CLIPModel.from_pretrained(str(tmp_path / "run" / "clip"))
    encoder = create_encoder(tmp_path / "run" / "encoder")
    state = load_file(str(tmp_path / "run" / "clip" / "model.safetensors"))
    assert clip.config.projection_dim == 32 and any(k.startswith("text_model.") for k in state)
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = encoder(pixels)["pooled"]
        theirs = clip.vision_model(pixel_values=pixels).pooler_output
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_resume_gives_the_same_next_step(phantom_dir, tmp_path):
    cfg = _cfg(phantom_dir, tmp_path / "full", epochs=2, val_split="none", augment=True)
    full = pretrain(cfg)
    part = replace(cfg, out=str(tmp_path / "part"), stop_after=1)
    stopped = pretrain(part)
    assert stopped["stopped_after_epoch"] == 1 and not (tmp_path / "part" / "encoder").exists()
    resumed = pretrain(replace(part, stop_after=None, resume="latest"))
    losses = [row["loss"] for row in full["history"]]
    assert [row["loss"] for row in resumed["history"]] == pytest.approx(losses, rel=1e-6)
    a = load_file(str(tmp_path / "full" / "encoder" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "encoder" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    with pytest.raises(DataError, match="seed"):  # another model or order would silently train something else
        pretrain(replace(part, stop_after=None, resume="latest", seed=5, epochs=3))
    with pytest.raises(DataError, match="augment=True, this run has augment=False"):  # another recipe, the same shapes
        pretrain(replace(part, stop_after=None, resume="latest", augment=False, epochs=3))


def test_resume_within_an_epoch_continues_after_the_last_step_saved(phantom_dir, tmp_path, monkeypatch):
    from pretrain import ContrastiveTask

    cfg = _cfg(phantom_dir, tmp_path / "full", epochs=2, val_split="none", augment=True, batch_size=8)
    full = pretrain(cfg)["history"]  # 42 pairs: 5 steps per epoch
    step, calls = ContrastiveTask.training_step, {"n": 0}

    def killed_in_step_8(self, *args):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return step(self, *args)

    part = replace(cfg, out=str(tmp_path / "part"), checkpoint_every=2)
    monkeypatch.setattr(ContrastiveTask, "training_step", killed_in_step_8)
    with pytest.raises(KeyboardInterrupt):
        pretrain(part)
    monkeypatch.undo()
    calls["n"] = 0
    monkeypatch.setattr(ContrastiveTask, "training_step", lambda self, *a: calls.update(n=calls["n"] + 1) or
                        step(self, *a))
    resumed = pretrain(replace(part, resume="latest"))["history"]
    assert calls["n"] == 10 - 7  # from the checkpoint after epoch 2's step 2 (steps 2, 4, end of epoch 1, 7)
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in full], rel=1e-6)


def test_mlm_loss_is_finite_and_decreases(phantom_dir, tmp_path):
    cfg = _cfg(phantom_dir, tmp_path / "run", epochs=6, mlm_weight=1.0, mlm_probability=0.3, val_split="none",
               batch_size=8, lr=3e-3)
    metrics = pretrain(cfg)
    mlm = [row["mlm_loss"] for row in metrics["history"]]
    assert all(torch.isfinite(torch.tensor(mlm))) and mlm[-1] < mlm[0] - 0.3, mlm
    assert load_clip_model(tmp_path / "run" / "clip").text.mlm_head is not None


def test_grad_checkpointing_pretrains_the_same_towers(phantom_dir, tmp_path, caplog):
    cfg = _cfg(phantom_dir, tmp_path / "plain", epochs=1, val_split="none")
    plain = pretrain(cfg)
    with caplog.at_level(logging.INFO, logger="vqa.training.engine"):
        checkpointed = pretrain(replace(cfg, out=str(tmp_path / "ckpt"), grad_checkpointing=True))
    assert "gradient checkpointing:" in caplog.text  # it was on: else the two runs agree by construction
    assert checkpointed["history"][0]["loss"] == pytest.approx(plain["history"][0]["loss"], rel=1e-5)
    a, b = (load_file(str(tmp_path / run / "encoder" / "model.safetensors")) for run in ("plain", "ckpt"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6, msg=key)


def test_frozen_text_tower_does_not_change(phantom_dir, tmp_path):
    cfg = _cfg(phantom_dir, tmp_path / "run", epochs=1, freeze_text=True, val_split="none")
    seed_everything(cfg.seed)
    initial = build_model(cfg, [p.caption for p in load_captions(cfg.data, "train")])
    pretrain(cfg)
    trained = load_clip_model(tmp_path / "run" / "clip")
    for (name, a), b in zip(initial.text.model.state_dict().items(), trained.text.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(initial.text_proj.weight, trained.text_proj.weight)  # the projection still learns
    assert not torch.equal(initial.image_proj.weight, trained.image_proj.weight)


@pytest.mark.parametrize("argv, message", [
    (["--encoder", "resnet-tinyy"], "unknown encoder 'resnet-tinyy'.*Known encoders: .*clip-vit-tiny"),
    (["--text", "bertt"], "unknown text tower"),
    (["--precision", "fp8"], "fp8"),
    (["--precision", "fp16", "--device", "cpu"], "fp16 needs a CUDA GPU"),
    (["--caption-column", "text"], "no field 'text'"),
    (["--batch-size", "500"], "fewer than one global batch"),
    (["--mlm-weight", "1", "--freeze-text"], "trainable text tower"),
    (["--encoder-arg", "image_size"], "KEY=VALUE"),
    (["--encoder", "resnet-tiny", "--grad-checkpointing", "--batch-size", "16"], "BatchNorm layers a second time"),
    (["--encoder", "vit-tiny", "--encoder-arg", "image_size=128"], "img_size"),
])
def test_bad_input_is_a_clear_error(phantom_dir, tmp_path, argv, message):
    base = ["--data", str(phantom_dir / "captions"), "--out", str(tmp_path / "o"), "--epochs", "1", "--no-progress"]
    with pytest.raises((DataError, ValueError), match=message):
        main(base + argv)


def test_empty_caption_file_and_cli_dispatch(tmp_path, capsys):
    from vqa.cli import main as cli

    (tmp_path / "train.jsonl").write_text("\n")
    assert cli(["pretrain", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "no image-caption pairs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["pretrain", "--help"])
    assert "medvqa pretrain" in capsys.readouterr().out
