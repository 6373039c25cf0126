"""The CLI layer: every command under `medvqa`, one flag per concept, examples in every --help."""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import re
import shlex
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vqa.cli import COMMANDS, main as cli
from vqa.cli.options import FORMAT_CHOICES, LR_SCHEDULES
from vqa.data import FORMATS


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help_with_an_example_and_no_outside_paths(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert f"medvqa {command}" in text and "example" in text
    assert "../" not in text  # examples point inside the repository or at path/to/...


def _example_commands(text: str) -> list[tuple[str, list[str]]]:
    """(command, its arguments) of every complete `medvqa COMMAND ...` line in `text`: backslash continuations
    joined, comments and other commands on the line (&&, |, ;) dropped, shell variables as 0 (loop indices);
    elided examples (`...`) and --help lines are not commands to parse."""
    found = []
    for line in re.sub(r"\\\n\s*", " ", text).splitlines():
        for part in re.split(r"\s(?:&&|\||;)\s", re.split(r"\s#\s", line.strip())[0]):
            match = re.match(r"^(?:\S*/)?medvqa (\S+)(.*)$", part.strip())
            if match and match.group(1) in COMMANDS and "..." not in part:
                argv = [re.sub(r"^\$\{?\w+\}?$", "0", a) for a in shlex.split(match.group(2))]
                if not {"-h", "--help"} & set(argv):
                    found.append((match.group(1), argv))
    return found


def _shell_blocks(markdown: str) -> str:
    """The bash (or unlabelled) fenced code blocks of a Markdown text, concatenated."""
    out, block, lang = [], None, ""
    for line in markdown.splitlines():
        if line.startswith("```"):
            if block is None:
                block, lang = [], line[3:].strip()
            else:
                out += block if lang in ("", "bash", "sh", "shell") else []
                block = None
        elif block is not None:
            block.append(line)
    return "\n".join(out)


def test_every_example_in_help_and_readme_parses(capsys):
    """An example whose flag was renamed or dropped fails here, not on the user who copies it."""
    helps = []
    for name, (module, _) in COMMANDS.items():
        parser = importlib.import_module(f"vqa.cli.{module}").build_parser()
        subparsers = [a.choices.values() for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        helps += [parser.format_help(), *(p.format_help() for group in subparsers for p in group)]
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    examples = _example_commands("\n".join(helps)) + _example_commands(_shell_blocks(readme))
    assert len({c for c, _ in examples}) == len(COMMANDS) and len(examples) >= 100
    for command, argv in examples:
        parser = importlib.import_module(f"vqa.cli.{COMMANDS[command][0]}").build_parser()
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"medvqa {command} {shlex.join(argv)}: {capsys.readouterr().err.strip().splitlines()[-1]}")


def test_the_dataset_format_flag_is_one_flag_with_one_set_of_choices(capsys):
    from vqa.training import LR_SCHEDULES as ENGINE_SCHEDULES

    assert FORMAT_CHOICES == tuple(FORMATS)
    assert LR_SCHEDULES == ENGINE_SCHEDULES  # written twice so that --help needs no torch
    for argv in (["train"], ["eval"], ["cache-features"], ["data", "stats"]):
        with pytest.raises(SystemExit):
            cli([*argv, "--help"])
        text = capsys.readouterr().out
        assert "--format {" + ",".join(FORMAT_CHOICES) + "}" in text, argv
        assert "--dataset" not in text and "--lang" in text


def test_english_only_datasets_refuse_another_language(phantom_dir, capsys):
    assert cli(["data", "stats", str(phantom_dir / "vqa-rad"), "--format", "vqa-rad", "--lang", "zh"]) == 2
    assert "English questions only" in capsys.readouterr().err


def test_pretrain_with_zero_epochs_writes_the_untrained_towers(phantom_dir, tmp_path):
    from pretrain import PretrainConfig
    from pretrain.data import load_captions
    from pretrain.train import build_model
    from vqa.training import seed_everything

    out = tmp_path / "untrained"
    assert cli(["pretrain", "--data", str(phantom_dir / "captions"), "--epochs", "0", "--embed-dim", "16",
                "--out", str(out), "--no-progress", "--threads", "1"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["history"] == [] and metrics["before"] == metrics["after"]
    cfg = PretrainConfig(data=str(phantom_dir / "captions"), embed_dim=16)
    seed_everything(cfg.seed)
    initial = build_model(cfg, [p.caption for p in load_captions(cfg.data, "train")])
    saved = load_file(str(out / "encoder" / "model.safetensors"))
    for key, value in initial.image_encoder.state_dict().items():
        assert torch.equal(saved[key], value), key


def test_zero_shot_skips_fields_whose_classes_the_prompts_do_not_name(caplog):
    from pretrain.data import CaptionPair
    from pretrain.evaluate import zero_shot

    pairs = [CaptionPair("a.png", "c", {"modality": "ct - noncontrast"}, "1"),
             CaptionPair("b.png", "c", {"modality": "mri"}, "2")]
    prompts = {"modality": {"templates": ["{} image."], "names": {"ct": ["CT"], "mri": ["MRI"]}}}
    with caplog.at_level(logging.WARNING, logger="pretrain.evaluate"):
        assert zero_shot(None, torch.zeros(2, 4), pairs, prompts, torch.device("cpu")) == {}
    assert "ct - noncontrast" in caplog.text and "--prompts" in caplog.text


def test_pretrain_eval_reads_the_split_as_pretrain_does(phantom_dir, tmp_path):
    import shutil

    captions = shutil.copytree(phantom_dir / "captions", tmp_path / "captions")
    for split in ("train", "validate"):  # MedPix 2.0 marks the pairs whose image VQA-RAD also holds
        rows = [json.loads(line) for line in (captions / f"{split}.jsonl").read_text().splitlines()]
        for i, row in enumerate(rows):
            row["also_in_vqa_rad"] = split == "validate" and i < 5
        (captions / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli(["pretrain", "--data", str(captions), "--epochs", "0", "--embed-dim", "16", "--exclude-vqa-rad",
                "--out", str(tmp_path / "p"), "--no-progress"]) == 0
    saved = json.loads((tmp_path / "p" / "metrics.json").read_text())["after"]
    for exclude, n in ((["--exclude-vqa-rad"], len(rows) - 5), ([], len(rows))):
        assert cli(["pretrain-eval", "--model", str(tmp_path / "p" / "clip"), "--data", str(captions), *exclude,
                    "--out", str(tmp_path / "m.json")]) == 0
        metrics = json.loads((tmp_path / "m.json").read_text())
        assert metrics["retrieval"]["n"] == n and metrics["protocol"]["exclude_vqa_rad"] == bool(exclude)
    assert saved["retrieval"]["n"] == len(rows) - 5  # pretraining left them out of its validation too
    assert cli(["pretrain-eval", "--model", str(tmp_path / "p" / "clip"), "--data", str(captions),
                "--exclude-vqa-rad", "--out", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["retrieval"] == saved["retrieval"]


@pytest.mark.parametrize("argv", [
    ["predict", "--bundle", "b", "--image", "x.png", "--question", "q"],
    ["eval", "--bundle", "b", "--format", "vqa-rad", "--data", "d"],
    ["demo", "--bundle", "b"],
    ["export", "onnx", "b"],
])
def test_threads_and_device_mean_the_same_in_every_command_that_has_them(argv, capsys):
    # one option group (vqa/cli/options.py), acted on by apply_runtime before anything is loaded
    assert cli([*argv, "--threads", "0"]) == 2
    assert "--threads must be at least 1, got 0" in capsys.readouterr().err
    if argv[0] != "export":  # the export traces on the CPU: it has no --device
        assert cli([*argv, "--device", "tpu"]) == 2
        assert "--device tpu: expected auto, cpu, cuda or cuda:N" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["predict", "demo"])  # the commands with --runtime
def test_the_onnx_runtime_answers_on_the_cpu_under_device_auto_beside_a_gpu(command, monkeypatch):
    import torch

    from vqa.cli import demo, predict
    from vqa.cli.options import apply_runtime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine
    parser = {"predict": predict, "demo": demo}[command].build_parser()
    required = {"predict": ["--image", "x.png", "--question", "q"], "demo": []}[command]
    argv = ["--bundle", "b", *required, "--threads", "1"]
    assert apply_runtime(parser.parse_args([*argv, "--runtime", "onnx", "--device", "auto"])) == torch.device("cpu")
    assert apply_runtime(parser.parse_args([*argv, "--device", "auto"])) == torch.device("cuda")  # torch: the GPU


def test_an_output_path_that_is_a_file_is_one_line_and_exit_2(phantom_dir, tmp_path, capsys, monkeypatch):
    """The system's own errors (a file where a folder is needed) are input errors too: named, no traceback,
    unless MEDVQA_TRACEBACK asks for one (0 does not)."""
    taken = tmp_path / "README.md"
    taken.write_text("not a folder")
    argv = ["phantom", str(taken / "phantom"), "--images", "10"]
    monkeypatch.setenv("MEDVQA_TRACEBACK", "0")
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("medvqa phantom: error:") and "README.md" in err and "Traceback" not in err
    monkeypatch.setenv("MEDVQA_TRACEBACK", "1")
    with pytest.raises(OSError):
        cli(argv)


def test_data_stats_freeform_cuts_test_only(phantom_dir, tmp_path, capsys):
    """MEVF's 308-question subset is of test: the models train on all of train, the baselines are train's."""
    import shutil

    from vqa.data import load_vqa_rad

    root = shutil.copytree(phantom_dir / "vqa-rad", tmp_path / "vqa-rad")
    for name, other in (("trainset.json", "para"), ("testset.json", "test_para")):  # as the release mixes them
        items = json.loads((root / name).read_text())
        for item in items[::3]:
            item["phrase_type"] = other
        (root / name).write_text(json.dumps(items))
    assert cli(["data", "stats", str(root), "--format", "vqa-rad", "--freeform", "--json"]) == 0
    splits = json.loads(capsys.readouterr().out)["splits"]
    assert splits["train"]["questions"] == len(load_vqa_rad(root, "train"))
    assert splits["test"]["questions"] == len(load_vqa_rad(root, "test", freeform_only=True))
    assert splits["test"]["questions"] < len(load_vqa_rad(root, "test"))
