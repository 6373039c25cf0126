"""Zero-shot multiple choice (`medvqa eval --zero-shot-clip`): PMC-VQA-format questions scored by image-text
similarity with a CLIP model and no VQA training, with and without the question in the prompt."""
from __future__ import annotations

import json

import pytest
import torch

from pretrain.zero_shot_choice import evaluate_zero_shot_choice, prompt_variants, score_choices
from vqa.cli import main as cli
from vqa.data.record import Record
from vqa.errors import DataError


def test_phantom_pretrained_clip_beats_chance_clearly(phantom_clip, tmp_path):
    phantom, run = phantom_clip
    out = tmp_path / "zs"
    assert cli(["eval", "--zero-shot-clip", str(run / "clip"), "--format", "pmc-vqa", "--data",
                str(phantom / "pmc-vqa"), "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
                "--threads", "1", "--no-progress"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    variants = report["variants"]
    assert set(variants) == {"choice", "question+choice"} and report["headline"] == "choice"
    # measured (96 test questions): 66.7 % with the choice alone, 61.5 % with the question before it; chance 25 %
    for name, m in variants.items():
        assert m["chance"] == pytest.approx(0.25) and m["n"] == 96
        assert m["overall"] >= 0.45, (name, m)
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 96 and sum(r["choice"]["correct"] for r in rows) == round(96 * variants["choice"]["overall"])
    assert all(abs(sum(r["choice"]["probabilities"]) - 1) < 1e-4 for r in rows)
    assert "`{question} {choice}`" in (out / "report.md").read_text()
    # the same images, an untrained CLIP: near chance, far below the pretrained one
    from pretrain import PretrainConfig, pretrain

    pretrain(PretrainConfig(data=str(phantom / "captions"), encoder="timm:resnet10t", epochs=0, embed_dim=64,
                            encoder_args={"image_size": 64, "model_kwargs": {"channels": [16, 32, 64, 128],
                                                                             "stem_width": 16}},
                            out=str(tmp_path / "untrained"), progress=False, val_split="none"))
    control, _, _ = evaluate_zero_shot_choice(str(tmp_path / "untrained" / "clip"), "pmc-vqa", str(phantom / "pmc-vqa"),
                                              cache_dir=str(tmp_path / "cache"), progress=False, device="cpu")
    assert control["subsets"]["all"]["overall"] < variants["choice"]["overall"] - 0.2


class _Fixed:
    """A stand-in CLIP whose text embeddings are chosen by hand (tests the scoring rule alone)."""

    logit_scale = 10.0

    def __init__(self, table):
        self.table = table

    def text_embeddings(self, texts):
        return torch.nn.functional.normalize(torch.tensor([self.table[t] for t in texts]), dim=-1)


def test_scoring_rule_cosine_argmax_first_of_ties_and_softmax():
    record = Record(image=None, question="What?", answer="b", answer_type="OPEN", question_type="x",
                    choices=("a", "b", "c", "d"))
    clip = _Fixed({"a": [1.0, 0.0], "b": [0.0, 1.0], "c": [0.0, 1.0], "d": [-1.0, 0.0]})
    image = torch.tensor([[0.0, 1.0]])
    answers, probs = score_choices(clip, [record], image, [0], "{choice}")
    assert answers == ["b"]  # b and c tie at cosine 1: the first listed wins
    expected = torch.tensor([0.0, 1.0, 1.0, 0.0]).mul(10).softmax(-1)
    assert probs[0] == pytest.approx(expected.tolist())
    clip = _Fixed({"What? a": [0.0, 1.0], "What? b": [1.0, 0.0], "What? c": [1.0, 0.0], "What? d": [1.0, 0.0]})
    assert score_choices(clip, [record], image, [0], "{question} {choice}")[0] == ["a"]


def test_prompt_templates_and_data_without_choices_are_checked(phantom_dir, tmp_path):
    assert prompt_variants(None) == {"choice": "{choice}", "question+choice": "{question} {choice}"}
    with pytest.raises(DataError, match="needs {choice}"):
        prompt_variants(["{question}"])
    with pytest.raises(DataError, match="only {question} and {choice}"):
        prompt_variants(["{choice} {modality}"])
    with pytest.raises(DataError, match="have no choices .* needs multiple-choice data"):
        evaluate_zero_shot_choice(str(tmp_path / "none"), "vqa-rad", str(phantom_dir / "vqa-rad"), progress=False)


def test_cli_needs_exactly_one_model(phantom_dir, capsys):
    data = ["--format", "pmc-vqa", "--data", str(phantom_dir / "pmc-vqa")]
    with pytest.raises(SystemExit):
        cli(["eval", *data])
    assert "pass one of --bundle" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["eval", "--bundle", "b", "--zero-shot-clip", "c", *data])
    assert "pass one of --bundle" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # taken and never used: refused
        cli(["eval", "--zero-shot-clip", "c", "--precision", "bf16", *data])
    assert "--precision goes with --bundle" in capsys.readouterr().err
