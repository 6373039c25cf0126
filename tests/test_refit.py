"""`medvqa train --refit`: validation chooses the epoch, then the run starts again on train + validation for that
many epochs of its schedule; the refit model is what the bundle holds."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from vqa.errors import DataError
from vqa.train import TrainConfig, load_splits, train
from vqa.trust import TrustScorer

TINY = dict(encoder="clip-vit-tiny", question_encoder="bert-tiny", question_lr=1e-3, head="fusion-transformer-qcr",
            head_args={"hidden_dim": 32, "layers": 1, "attention_heads": 2}, batch_size=32, epochs=4,
            progress=False, device="cpu")


def _cfg(phantom_dir, tmp_path, name, **kw) -> TrainConfig:
    return TrainConfig(**{**TINY, "data": str(phantom_dir / "vqa-rad"), "cache_dir": str(tmp_path / "cache"),
                          "out": str(tmp_path / name), **kw})


def _weights(bundle) -> dict:
    return load_file(str(bundle / "model.safetensors"))


@pytest.mark.slow  # eight training runs (validation, refit, resumed and stopped refits): end to end
def test_a_refit_trains_again_on_train_and_validation_for_the_chosen_epochs(phantom_dir, tmp_path):
    from .test_transfer import _same_answers_everywhere

    cfg = _cfg(phantom_dir, tmp_path, "refit", refit=True)
    bundle = train(cfg)
    metrics = json.loads((bundle / "metrics.json").read_text())
    train_records, val_records, _ = load_splits(cfg)
    chosen = metrics["best_epoch"]
    assert metrics["refit"]["epochs"] == chosen and metrics["refit"]["questions"] == len(train_records) + len(
        val_records)
    refit_history = json.loads((tmp_path / "refit" / "refit" / "history.json").read_text())
    assert [row["epoch"] for row in refit_history] == list(range(1, chosen + 1))
    assert all("val_overall" not in row for row in refit_history)  # nothing held out, nothing scored
    # the same schedule, stopped at the chosen epoch: the learning rate where the validation run's was then
    validation_history = metrics["history"]
    assert refit_history[-1]["lr"] == pytest.approx(validation_history[chosen - 1]["lr"], rel=1e-6)
    assert "trained again on train and validation" in metrics["protocol"]["model_selection"]
    card = (bundle / "README.md").read_text()  # the validation numbers are the run's before its refit, said so
    assert "| validation, the run before its refit / all |" in card and "(`--refit`): this model" in card
    calibration = json.loads((bundle / "calibration.json").read_text())
    assert "the refit trained on these questions" in json.dumps(calibration)
    # the trust memory is the refit model's own (the questions it trained on, in its fused space)
    memory = TrustScorer.load(bundle)
    assert len(train_records) < len(memory.answers) <= metrics["refit"]["questions"]

    plain = train(_cfg(phantom_dir, tmp_path, "plain"))  # the validation run alone
    plain_metrics = json.loads((plain / "metrics.json").read_text())
    assert plain_metrics["best_epoch"] == chosen
    # ... while the weights combining trust with confidence are the validation run's
    assert json.loads((plain / "calibration.json").read_text())["trust_weights"] == calibration["trust_weights"]
    assert len(TrustScorer.load(plain).answers) <= len(train_records)
    assert [r["loss"] for r in plain_metrics["history"]] == [r["loss"] for r in validation_history]
    assert not all(torch.equal(a, b) for a, b in zip(_weights(bundle).values(), _weights(plain).values()))
    _same_answers_everywhere(bundle, phantom_dir, tmp_path)

    # A finished validation run refits later with --resume latest, its own training untouched, to the same model;
    # a refit stopped partway resumes to the same model too.
    later = train(_cfg(phantom_dir, tmp_path, "plain", refit=True, resume="latest"))
    assert json.loads((later / "metrics.json").read_text())["history"] == plain_metrics["history"]
    assert all(torch.equal(a, _weights(bundle)[k]) for k, a in _weights(later).items())
    assert chosen > 1  # (deterministic) so that the refit below can stop partway
    train(_cfg(phantom_dir, tmp_path, "stopped"))
    train(_cfg(phantom_dir, tmp_path, "stopped", refit=True, stop_after=1, resume="latest"))
    assert len(json.loads((tmp_path / "stopped" / "refit" / "history.json").read_text())) == 1
    resumed = train(_cfg(phantom_dir, tmp_path, "stopped", refit=True, resume="latest"))
    assert all(torch.equal(a, _weights(bundle)[k]) for k, a in _weights(resumed).items())


def test_a_refit_is_refused_where_validation_is_test_and_in_an_ensemble(phantom_dir, tmp_path):
    from vqa.ensemble import EnsembleConfig, build_ensemble

    for test in ("test", "test_clean"):  # a test file by its own name (PMC-VQA's) is test too
        with pytest.raises(DataError, match="--refit.*which here is test"):
            train(_cfg(phantom_dir, tmp_path, "t", refit=True, val_split=test))
    assert not (tmp_path / "t").exists()
    members = [train(_cfg(phantom_dir, tmp_path, f"m{s}", refit=s == 1, seed=s, val_seed=5, epochs=2))
               for s in (0, 1)]
    with pytest.raises(DataError, match="--refit"):
        build_ensemble(EnsembleConfig(members=[str(m) for m in members], format="vqa-rad",
                                      data=str(phantom_dir / "vqa-rad"), out=str(tmp_path / "ensemble"),
                                      cache_dir=str(tmp_path / "cache"), device="cpu", progress=False))


@pytest.mark.slow
def test_a_refit_in_two_processes_matches_one_on_the_same_global_batch(phantom_dir, tmp_path):
    """Only the main process scores validation: the epoch it chose reaches every rank, whose refit then agrees
    with one process's."""
    import dataclasses

    from .conftest import spawn_ranks

    # no dropout, so the two runs differ only in how the global batch is split
    head_args = {"hidden_dim": 32, "dropout": 0.0, "attention_dropout": 0.0, "classifier_dropout": 0.0}
    base = _cfg(phantom_dir, tmp_path, "base", refit=True, head="mevf-ban", head_args=head_args,
                question_encoder="gru", question_lr=None, question_dim=32, embed_dim=16, epochs=3)
    single = train(dataclasses.replace(base, batch_size=24, out=str(tmp_path / "one")))
    spawn_ranks(train, dataclasses.replace(base, batch_size=12, out=str(tmp_path / "two")))
    one, two = (json.loads((tmp_path / name / "bundle" / "metrics.json").read_text()) for name in ("one", "two"))
    assert one["refit"]["epochs"] == two["refit"]["epochs"] == one["best_epoch"]
    for a, b in zip(one["refit"]["history"], two["refit"]["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    wa, wb = _weights(single), _weights(tmp_path / "two" / "bundle")
    # BAN's attention-logit bias is one constant per glimpse under a softmax over all region x word pairs: it moves
    # no output, its gradient is rounding noise, and the optimizer's normalised steps turn that noise into lr-sized
    # moves that differ with the batch split (measured 3e-4 apart on an AMX CPU, every other weight within 3e-7)
    for key in (k for k in wa if k != "fusion.att_logits.bias"):
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=2e-5, msg=key)
