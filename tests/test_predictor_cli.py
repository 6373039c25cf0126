"""`medvqa predict`: one question, a JSONL batch, and the errors a user can make."""
from __future__ import annotations

import json

import pytest

from ._bundle import ground_truth
from vqa.cli import main


def predict(*args: str) -> int:
    """`medvqa predict ...` in this process, keeping the session's torch thread count."""
    import torch

    return main(["predict", "--threads", str(torch.get_num_threads()), *args])


def test_single(trained_bundle, predictor, predictor_phantom, capsys, tmp_path):
    row = ground_truth(predictor_phantom)[0]
    heatmap = tmp_path / "heat.png"
    assert predict("--bundle", str(trained_bundle), "--image", str(row["image"]),
                   "--question", row["question"], "--top-k", "3", "--attention", "--heatmap", str(heatmap)) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["answer"] == predictor.predict(row["image"], row["question"]).answer
    assert len(out["top_k"]) <= 3 and out["score_kind"] == "sigmoid"
    assert out["question_type"] in ("CLOSED", "OPEN") and out["question_type_source"] == "router"
    assert out["attention"]["grid_size"] == [4, 4] and heatmap.is_file()


def test_batch(trained_bundle, predictor, predictor_phantom, capsys, tmp_path):
    rows = ground_truth(predictor_phantom)[:10]
    batch = tmp_path / "q.jsonl"
    lines = [{"id": f"q{i}", "image": str(r["image"]), "question": r["question"]} for i, r in enumerate(rows)]
    lines[3] = {"id": "rel", "image": rows[3]["image"].name, "question": rows[3]["question"]}  # relative path
    (tmp_path / rows[3]["image"].name).write_bytes(rows[3]["image"].read_bytes())
    text = "\n".join(json.dumps(x) for x in lines)
    text += "\n\n" + json.dumps({"id": "bad-image", "image": "nowhere.png", "question": "Is there a lesion?"})
    text += "\n" + json.dumps({"id": "bad-question", "image": str(rows[0]["image"]), "question": ""}) + "\n"
    batch.write_text(text)
    out = tmp_path / "answers" / "a.jsonl"
    assert predict("--bundle", str(trained_bundle), "--batch", str(batch), "--out", str(out),
                   "--batch-size", "4") == 1  # two bad lines
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in results] == [x["id"] for x in lines] + ["bad-image", "bad-question"]
    for r, row in zip(results, rows):
        assert r["answer"] == predictor.predict(row["image"], row["question"]).answer
    assert "nowhere.png (looked in" in results[-2]["error"] and results[-2]["line"] == 12
    assert "empty" in results[-1]["error"]
    assert "answered 10 question(s), 2 failed" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--image", "x.png"], "go together"),
    ([], "either --image"),
    (["--image", "x.png", "--question", "q?", "--out", "a.jsonl"], "--out goes with --batch"),
    (["--batch", "b.jsonl", "--heatmap", "h.png"], "--heatmap goes with --image and --question"),
    (["--batch", "b.jsonl", "--choices", "a", "b"], "--choices goes with --image and --question"),
])
def test_usage_errors(trained_bundle, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        predict("--bundle", str(trained_bundle), *args)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_input_errors_are_one_line(trained_bundle, predictor_phantom, capsys, tmp_path):
    image = str(ground_truth(predictor_phantom)[0]["image"])
    assert predict("--bundle", str(trained_bundle), "--image", image, "--question", " ") == 2
    assert "question is empty" in capsys.readouterr().err
    assert predict("--bundle", str(trained_bundle), "--image", str(tmp_path / "no.png"),
                   "--question", "Is there a lesion?") == 2
    assert "no.png" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.png", "question": "q"}\nnot json\n')
    assert predict("--bundle", str(trained_bundle), "--batch", str(bad)) == 2
    assert "line 2: invalid JSON" in capsys.readouterr().err


def test_batch_from_csv_with_a_progress_bar(trained_bundle, predictor, predictor_phantom, capsys, tmp_path):
    import csv

    rows = ground_truth(predictor_phantom)[:6]
    (tmp_path / rows[0]["image"].name).write_bytes(rows[0]["image"].read_bytes())
    batch = tmp_path / "questions.csv"
    with open(batch, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "image", "question"])
        writer.writerow(["rel", rows[0]["image"].name, rows[0]["question"]])  # relative to the CSV's folder
        for i, r in enumerate(rows[1:]):
            writer.writerow([f"q{i}", str(r["image"]), r["question"]])
        writer.writerow(["bad", str(rows[0]["image"]), ""])
    out = tmp_path / "a.jsonl"
    assert predict("--bundle", str(trained_bundle), "--batch", str(batch), "--out", str(out)) == 1
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in results] == ["rel", "q0", "q1", "q2", "q3", "q4", "bad"]
    assert [r["line"] for r in results] == list(range(2, 9))  # the header is line 1
    for r, row in zip(results, rows):
        assert r["answer"] == predictor.predict(row["image"], row["question"]).answer
    assert "empty" in results[-1]["error"]
    err = capsys.readouterr().err
    assert "answering: 100%" in err and "7/7" in err  # tqdm's bar, on stderr
    assert predict("--bundle", str(trained_bundle), "--batch", str(batch), "--out", str(out), "--no-progress") == 1
    assert "answering" not in capsys.readouterr().err


def test_batch_choices_for_a_vocabulary_head_and_a_csv_without_its_columns(trained_bundle, predictor_phantom,
                                                                           capsys, tmp_path):
    image = str(ground_truth(predictor_phantom)[0]["image"])
    batch = tmp_path / "q.jsonl"
    batch.write_text(json.dumps({"image": image, "question": "Is there a lesion?", "choices": ["yes", "no"]}) + "\n")
    out = tmp_path / "a.jsonl"
    assert predict("--bundle", str(trained_bundle), "--batch", str(batch), "--out", str(out), "--no-progress") == 1
    assert "cannot be used" in json.loads(out.read_text())["error"]
    capsys.readouterr()
    bad = tmp_path / "bad.csv"
    bad.write_text("picture,question\na.png,Is there a lesion?\n")
    assert predict("--bundle", str(trained_bundle), "--batch", str(bad)) == 2
    assert "missing column(s) ['image']" in capsys.readouterr().err


def test_choices_parse_from_json_lists_and_csv_text():
    from vqa.cli.predict import parse_choices
    from vqa.errors import DataError

    assert parse_choices(["ct", " mri "]) == ["ct", "mri"] and parse_choices("ct | mri|x-ray") == ["ct", "mri", "x-ray"]
    assert parse_choices("") is None and parse_choices(None) is None
    with pytest.raises(DataError, match="choices"):
        parse_choices("ct||mri")
