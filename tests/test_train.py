"""VQA training: bundles reload exactly, resume repeats the uninterrupted run, eval writes its report."""
from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from vqa.bundle import load as load_bundle
from vqa.data import load_vqa_rad
from vqa.errors import DataError
from vqa.evaluate import evaluate, predict_records, write_outputs
from vqa.train import TrainConfig, selection, train

TINY = dict(encoder="clip-vit-tiny", head_args={"hidden_dim": 32}, question_dim=32, embed_dim=16,
            batch_size=32, progress=False)


def _cfg(phantom_dir, tmp_path, **kw) -> TrainConfig:
    return TrainConfig(**{**TINY, "data": str(phantom_dir / "vqa-rad"), "cache_dir": str(tmp_path / "cache"),
                          "out": str(tmp_path / "run"), "epochs": 2, **kw})


@pytest.fixture(scope="module")
def qcr_bundle(phantom_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qcr")
    return train(_cfg(phantom_dir, tmp, head="qcr"))


def test_bundle_files_and_metrics(qcr_bundle):
    for name in ("config.json", "model.safetensors", "answers.json", "vocab.json", "metrics.json",
                 "encoder/config.json", "encoder/model.safetensors"):
        assert (qcr_bundle / name).is_file(), name
    metrics = json.loads((qcr_bundle / "metrics.json").read_text())
    assert metrics["protocol"]["answers"] == "train-only"
    assert "never test" in metrics["protocol"]["model_selection"]
    assert metrics["best_epoch"] in (1, 2) and len(metrics["history"]) == 2
    config = json.loads((qcr_bundle / "config.json").read_text())
    assert config["head"]["name"] == "qcr" and config["answers"]["size"] > 2


def test_bundle_files_have_the_usual_modes(qcr_bundle):
    """Every file of a bundle (weights, detector, encoder included) is readable as the umask allows: a folder shared
    with a group is usable by it (temp files are private until published)."""
    import os
    import stat

    mask = os.umask(0)
    os.umask(mask)
    files = [p for p in qcr_bundle.rglob("*") if p.is_file()]
    assert {"model.safetensors", "ood.safetensors"} <= {p.name for p in files}
    modes = {str(p.relative_to(qcr_bundle)): stat.S_IMODE(p.stat().st_mode) for p in files}
    assert modes == {name: 0o666 & ~mask for name in modes}


def test_bundle_reloads_with_identical_predictions(qcr_bundle, phantom_dir, tmp_path):
    records = load_vqa_rad(phantom_dir / "vqa-rad", "test")
    a = load_bundle(qcr_bundle)
    b = load_bundle(qcr_bundle)
    pa = predict_records(a, records, torch.device("cpu"), cache_dir=str(tmp_path / "c1"), progress=False)
    pb = predict_records(b, records, torch.device("cpu"), cache_dir=str(tmp_path / "c2"), progress=False)
    assert pa.answers == pb.answers and pa.types == pb.types
    assert torch.equal(pa.logits, pb.logits)
    # and what loads is the model training chose: it scores validation exactly as the chosen epoch did
    from vqa.train import evaluate_split, load_splits, make_split

    cfg = _cfg(phantom_dir, tmp_path, head="qcr")
    _, val_records, _ = load_splits(cfg)
    val = make_split(cfg, a.model, val_records, a.tokenizer, a.answers, torch.device("cpu"))
    chosen = {k: v for k, v in json.loads((qcr_bundle / "metrics.json").read_text())["validation"].items()
              if k != "epoch"}
    assert evaluate_split(a.model, val, a.answers, torch.device("cpu"), "fp32") == chosen


def test_resume_matches_uninterrupted_run(phantom_dir, tmp_path):
    straight = train(_cfg(phantom_dir, tmp_path / "a", epochs=3, head="mevf-san"))
    # Stop after epoch 1 (a run that crashed there leaves the same checkpoint), then resume.
    train(_cfg(phantom_dir, tmp_path / "b", epochs=3, head="mevf-san", stop_after=1))
    assert not (tmp_path / "b" / "run" / "bundle").exists()
    resumed = train(_cfg(phantom_dir, tmp_path / "b", epochs=3, head="mevf-san", resume="latest"))
    wa, wb = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    ha = json.loads((straight.parent / "history.json").read_text())
    hb = json.loads((resumed.parent / "history.json").read_text())
    assert [r["loss"] for r in ha] == [r["loss"] for r in hb]


def test_resume_refuses_another_model(phantom_dir, tmp_path):
    train(_cfg(phantom_dir, tmp_path, epochs=1, head="mevf-san"))
    with pytest.raises(DataError, match="checkpoint was trained with head='mevf-san'"):
        train(_cfg(phantom_dir, tmp_path, epochs=2, head="mevf-ban", resume="latest"))


def test_resume_refuses_another_learning_rate_or_schedule(phantom_dir, tmp_path):
    train(_cfg(phantom_dir, tmp_path, head="mevf-san", lr=1e-3, stop_after=1))
    for change, message in ((dict(lr=2e-3), "lr=0.001, this run has lr=0.002"),
                            (dict(lr_schedule="constant"), "lr_schedule='cosine', this run has lr_schedule='constant'"),
                            (dict(epochs=3), "schedule runs 2 epochs .*this run's 3"),
                            (dict(epochs=1, schedule_epochs=3), "schedule runs 2 epochs .*this run's 3"),
                            # the task's own: the optimizer state would bring back the old rates and kind
                            (dict(optimizer="adamw"), "optimizer='adamax', this run has optimizer='adamw'"),
                            # what changes training without changing a weight's shape
                            (dict(clip_norm=1.0), "clip_norm=0.25, this run has clip_norm=1.0"),
                            (dict(max_len=6), "max_len=None, this run has max_len=6"),
                            (dict(aux_weight=0.5), "aux_weight=0.001, this run has aux_weight=0.5")):
        with pytest.raises(DataError, match=message):
            train(_cfg(phantom_dir, tmp_path, head="mevf-san", resume="latest", **{"lr": 1e-3, **change}))
    # a checkpoint from before --lr-schedule trained with cosine decay, and resumes so
    path = tmp_path / "run" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    state["config"] = json.dumps({k: v for k, v in json.loads(state["config"]).items() if k != "lr_schedule"})
    torch.save(state, path)
    with pytest.raises(DataError, match="lr_schedule='cosine', this run has lr_schedule='constant'"):
        train(_cfg(phantom_dir, tmp_path, head="mevf-san", lr=1e-3, resume="latest", lr_schedule="constant"))
    resumed = train(_cfg(phantom_dir, tmp_path, head="mevf-san", lr=1e-3, resume="latest"))
    assert len(json.loads((resumed / "metrics.json").read_text())["history"]) == 2


def test_resume_refuses_other_rates_for_the_pretrained_towers(phantom_dir, tmp_path):
    """The optimizer state brings back each group's rate: an encoder or text-tower rate changed on resume would be
    recorded, not trained with. Where there is no such tower to train, the rate is refused outright."""
    tuned = dict(head="mevf-san", encoder_mode="finetune", question_encoder="bert-tiny", lr=1e-3)
    train(_cfg(phantom_dir, tmp_path, stop_after=1, **tuned))
    for change, message in ((dict(encoder_lr=1e-5), "encoder_lr=None, this run has encoder_lr=1e-05"),
                            (dict(question_lr=1e-5), "question_lr=None, this run has question_lr=1e-05")):
        with pytest.raises(DataError, match=message):
            train(_cfg(phantom_dir, tmp_path, resume="latest", **{**tuned, **change}))
    with pytest.raises(DataError, match="--encoder-lr apply when fine-tuning"):
        train(_cfg(phantom_dir, tmp_path / "frozen", head="mevf-san", encoder_lr=1e-5))
    with pytest.raises(DataError, match="--question-lr and --question-mode are a text tower's"):
        train(_cfg(phantom_dir, tmp_path / "gru", head="mevf-san", question_mode="frozen"))
    assert not (tmp_path / "frozen").exists() and not (tmp_path / "gru").exists()


def test_a_run_stopped_partway_down_a_longer_schedule_continues_down_it(phantom_dir, tmp_path):
    straight = train(_cfg(phantom_dir, tmp_path / "a", epochs=3, head="mevf-san"))
    # the first epoch of the 3-epoch schedule as a finished run of its own, then the rest from its checkpoint
    first = train(_cfg(phantom_dir, tmp_path / "b", epochs=1, schedule_epochs=3, head="mevf-san"))
    assert len(json.loads((first / "metrics.json").read_text())["history"]) == 1
    rest = train(_cfg(phantom_dir, tmp_path / "c", epochs=3, head="mevf-san",
                      resume=str(first.parent / "checkpoint.pt")))
    wa, wb = load_file(str(straight / "model.safetensors")), load_file(str(rest / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ha = json.loads((straight.parent / "history.json").read_text())
    hb = json.loads((rest.parent / "history.json").read_text())
    assert [r["lr"] for r in ha] == [r["lr"] for r in hb] and [r["loss"] for r in ha] == [r["loss"] for r in hb]


def test_a_call_stopped_early_prints_no_earlier_runs_numbers(phantom_dir, tmp_path, capsys):
    """Down a long schedule in stretches: the folder's bundle is the last finished stretch's; a call that
    --stop-after ends before its last epoch says so instead of printing that bundle's validation as its own."""
    from vqa.cli import main as cli

    data = str(phantom_dir / "vqa-rad")
    tiny = ["--format", "vqa-rad", "--data", data, "--encoder", "clip-vit-tiny", "--head", "mevf-san",
            "--head-arg", "hidden_dim=32", "--question-dim", "32", "--embed-dim", "16", "--device", "cpu",
            "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    assert cli(["train", *tiny, "--epochs", "1", "--schedule-epochs", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["bundle"] == str(tmp_path / "run" / "bundle")
    assert cli(["train", *tiny, "--epochs", "3", "--resume", "latest", "--stop-after", "1"]) == 0
    printed = capsys.readouterr()
    assert printed.out == "" and "stopped after 1 epoch(s) of this call" in printed.err


def test_resume_in_another_precision_is_logged(phantom_dir, tmp_path, caplog):
    train(_cfg(phantom_dir, tmp_path, head="mevf-san", stop_after=1))
    path = tmp_path / "run" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    state["config"] = json.dumps({**json.loads(state["config"]), "precision": "bf16"})  # as if made on a GPU
    torch.save(state, path)
    with caplog.at_level(logging.WARNING, logger="vqa.training.engine"):
        train(_cfg(phantom_dir, tmp_path, head="mevf-san", resume="latest"))
    assert "trained so far with --precision bf16, continuing with fp32" in caplog.text


def _stored_dtypes(bundle) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(bundle / "model.safetensors"), "pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


def test_a_float16_bundle_measures_and_calibrates_the_saved_copy(phantom_dir, tmp_path):
    """--weights-dtype float16: half the file, and the validation numbers and calibration the bundle records are
    those of the weights it stores (refitted here from the loaded bundle's own answers)."""
    from vqa.calibration import Calibration
    from vqa.metrics import vqa_metrics
    from vqa.train import load_splits

    cfg = _cfg(phantom_dir, tmp_path, head="qcr", weights_dtype="float16")
    half = train(cfg)
    full = train(_cfg(phantom_dir, tmp_path / "full", head="qcr"))
    assert _stored_dtypes(half) <= {"F16", "I64"} and "F32" in _stored_dtypes(full)
    assert (half / "model.safetensors").stat().st_size < 0.6 * (full / "model.safetensors").stat().st_size
    bundle = load_bundle(half)
    _, val, _ = load_splits(cfg)
    preds = predict_records(bundle, val, torch.device("cpu"), cache_dir=str(tmp_path / "cache"), progress=False)
    recorded = json.loads((half / "metrics.json").read_text())["validation"]
    assert recorded["overall"] == pytest.approx(vqa_metrics(val, preds.answers, preds.types)["overall"])
    correct = [p == r.answer for p, r in zip(preds.answers, val)]
    refit = Calibration.fit(preds.logits, preds.branches(), correct, "refit", cfg.target_risk)
    assert refit.temperatures == pytest.approx(bundle.calibration.temperatures, rel=1e-5)
    for branch, evidence in bundle.calibration.evidence.items():  # every validation answer's confidence
        assert evidence["confidence"] == pytest.approx(refit.evidence[branch]["confidence"], abs=1e-6)
    with pytest.raises(DataError, match="--weights-dtype 'bfloat16': expected one of float32, float16"):
        train(_cfg(phantom_dir, tmp_path / "bad", weights_dtype="bfloat16"))


def test_a_bundle_trained_in_bf16_records_and_calibrates_how_it_answers(phantom_dir, tmp_path, monkeypatch):
    """--precision bf16 trains under autocast, but the bundle answers in fp32 (`medvqa eval`, Predictor): the
    validation numbers, calibration and trust memory it records are its fp32 answers'."""
    from vqa import calibration
    from vqa.metrics import vqa_metrics
    from vqa.train import load_splits
    from vqa.trust import asked_about

    monkeypatch.setattr(calibration, "MIN_TRUST_FIT", 1)  # trust weights from the tiny run's few wrong answers
    cfg = _cfg(phantom_dir, tmp_path, head="qcr", precision="bf16")
    bundle = load_bundle(train(cfg))
    train_records, val, _ = load_splits(cfg)
    cpu, cache = torch.device("cpu"), str(tmp_path / "cache")
    preds = predict_records(bundle, val, cpu, cache_dir=cache, progress=False)  # fp32, as the bundle answers
    assert bundle.metrics["validation"]["overall"] == pytest.approx(
        vqa_metrics(val, preds.answers, preds.types)["overall"])
    # the trust memory: the fp32 fused vectors of the training questions (stored in float16)
    memory = bundle.calibration.trust
    fused = predict_records(bundle, train_records, cpu, cache_dir=cache, progress=False).fused
    kept = torch.tensor([bundle.answers.index(r.answer) >= 0 for r in train_records])  # answers in the vocabulary
    assert bundle.calibration.uses_trust and memory.features.shape == (int(kept.sum()), fused.shape[1])
    assert torch.allclose(memory.features, torch.nn.functional.normalize(fused[kept], dim=1), atol=1e-3)
    correct = [p == r.answer for p, r in zip(preds.answers, val)]
    refit = calibration.Calibration.fit(preds.logits, preds.branches(), correct, "refit", cfg.target_risk,
                                        trust=memory, fused=preds.fused, **asked_about(memory, val))
    assert refit.temperatures == pytest.approx(bundle.calibration.temperatures, rel=1e-5)
    for branch, evidence in bundle.calibration.evidence.items():  # every validation answer's confidence
        assert evidence["confidence"] == pytest.approx(refit.evidence[branch]["confidence"], abs=1e-5)


def test_resume_from_another_working_directory(phantom_dir, tmp_path, monkeypatch):
    """The data named relative to one directory and absolute from another is the same data: resuming goes on."""
    monkeypatch.chdir(phantom_dir)
    train(_cfg(phantom_dir, tmp_path, epochs=2, head="mevf-san", stop_after=1, data="vqa-rad"))
    monkeypatch.chdir(tmp_path)
    resumed = train(_cfg(phantom_dir, tmp_path, epochs=2, head="mevf-san", resume="latest"))
    assert len(json.loads((resumed.parent / "history.json").read_text())) == 2
    other = tmp_path / "elsewhere"
    shutil.copytree(phantom_dir / "vqa-rad", other)  # the same files in another folder: not provably the same data
    with pytest.raises(DataError, match="checkpoint was trained with data="):
        train(_cfg(phantom_dir, tmp_path, epochs=3, head="mevf-san", resume="latest", data=str(other)))


def test_eval_report_files(qcr_bundle, phantom_dir, tmp_path):
    report, records, preds = evaluate(qcr_bundle, "vqa-rad", str(phantom_dir / "vqa-rad"), device="cpu",
                                      cache_dir=str(tmp_path / "cache"), progress=False)
    m = report["subsets"]["all"]
    assert m["n"] == len(records) == m["n_closed"] + m["n_open"]
    assert 0 <= m["overall"] <= 1 and "open_bleu" in m and "type_accuracy" in m
    assert set(m["per_question_type"]) == {r.question_type for r in records}
    out = write_outputs(report, records, preds, tmp_path / "eval")
    for name in ("metrics.json", "report.md", "predictions.jsonl", "per_type.png", "closed_confusion.png"):
        assert (out / name).is_file(), name
    assert "| all |" in (out / "report.md").read_text()
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == len(records) and "predicted_type" in json.loads(lines[0])


def _broken_copy(bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    return copy


def test_bundle_bad_input(qcr_bundle, tmp_path):
    with pytest.raises(DataError, match="bundle folder not found"):
        load_bundle(tmp_path / "nope")
    b = _broken_copy(qcr_bundle, tmp_path / "1")
    (b / "vocab.json").unlink()
    with pytest.raises(DataError, match="bundle is missing vocab.json"):
        load_bundle(b)
    b = _broken_copy(qcr_bundle, tmp_path / "2")
    (b / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(DataError, match="cannot rebuild the model"):
        load_bundle(b)
    b = _broken_copy(qcr_bundle, tmp_path / "3")
    answers = json.loads((b / "answers.json").read_text())
    answers["answers"] = answers["answers"][:-1]
    (b / "answers.json").write_text(json.dumps(answers))
    with pytest.raises(DataError, match=r"answers.json: \d+ answers, but the weights"):
        load_bundle(b)
    b = _broken_copy(qcr_bundle, tmp_path / "4")
    words = json.loads((b / "vocab.json").read_text())
    (b / "vocab.json").write_text(json.dumps({"words": words["words"] + ["extra"]}))
    with pytest.raises(DataError, match=r"vocab.json: \d+ words, but the question encoder"):
        load_bundle(b)
    b = _broken_copy(qcr_bundle, tmp_path / "5")
    state = load_file(str(b / "model.safetensors"))
    state.pop(next(iter(state)))
    save_file(state, str(b / "model.safetensors"))
    with pytest.raises(DataError, match="weights do not match the head"):
        load_bundle(b)


def test_train_bad_input(phantom_dir, tmp_path):
    with pytest.raises(DataError, match="--encoder-mode 'thaw'"):
        train(_cfg(phantom_dir, tmp_path, encoder_mode="thaw"))
    with pytest.raises(DataError, match="--precision fp16 needs a CUDA GPU"):
        train(_cfg(phantom_dir, tmp_path, precision="fp16", device="cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(DataError, match="no CUDA GPU"):
            train(_cfg(phantom_dir, tmp_path, device="cuda"))


def test_model_selection_on_the_test_split_is_labelled_as_such():
    # The references pick their epoch on test; a bundle trained that way must say so in its protocol.
    assert "never test" in selection(TrainConfig())
    assert "optimistic" in selection(TrainConfig(val_split="test"))
    assert "never test" not in selection(TrainConfig(val_split="test"))
    for named in ("test_clean", "test_2", "test.csv"):  # PMC-VQA's test files by their own names are test too
        assert "optimistic" in selection(TrainConfig(format="pmc-vqa", val_split=named))
    assert "never test" in selection(TrainConfig(val_split="validate"))
