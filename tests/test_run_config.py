"""Rerunning a recorded run: `--config OUT/run_config.json` gives every value the command line does not."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from pretrain import PretrainConfig
from vqa.cli import main as cli
from vqa.cli.options import config_from_command_line
from vqa.cli.pretrain import build_parser as pretrain_parser
from vqa.cli.train import build_parser as train_parser
from vqa.errors import DataError
from vqa.target_risk import TargetRisk
from vqa.train import TrainConfig
from vqa.training import write_run_config

RECORDED = ["--format", "slake", "--data", "data/slake", "--head", "qcr", "--head-arg", "hidden_dim=96",
            "--head-arg", "glimpses=1", "--encoder-arg", "image_size=64", "--target-risk", "closed=0.05,open=0.2",
            "--lr", "0.004", "--epochs", "7", "--seed", "3", "--threads", "1", "--out", "runs/first",
            "--resume", "latest", "--stop-after", "2", "--no-progress"]


def _recorded(tmp_path, argv=RECORDED, parser=train_parser, cls=TrainConfig):
    cfg = config_from_command_line(cls, parser(), argv)
    if cls is TrainConfig:  # as `train` records it: the target resolved (a dataclass in the file)
        cfg = dataclasses.replace(cfg, target_risk=TargetRisk.parse(cfg.target_risk))
    write_run_config(cfg, tmp_path)
    return cfg, str(tmp_path / "run_config.json")


def test_a_rerun_is_the_recorded_run_but_for_how_it_is_invoked(tmp_path):
    first, path = _recorded(tmp_path)
    again = config_from_command_line(TrainConfig, train_parser(), ["--config", path, "--out", "runs/again"])
    assert TargetRisk.parse(again.target_risk) == first.target_risk and first.target_risk.of("CLOSED") == 0.05
    assert dataclasses.replace(again, target_risk=first.target_risk) == \
        dataclasses.replace(first, out="runs/again", resume=None, stop_after=None, progress=True)


def test_flags_given_override_the_recorded_values_and_head_args_key_by_key(tmp_path):
    _, path = _recorded(tmp_path)
    again = config_from_command_line(TrainConfig, train_parser(),
                                     ["--config", path, "--out", "o", "--seed", "4", "--head-arg", "glimpses=2",
                                      "--lr", "0.001"])
    assert (again.seed, again.lr, again.epochs, again.format) == (4, 0.001, 7, "slake")
    assert again.head_args == {"hidden_dim": 96, "glimpses": 2}
    assert again.encoder_args == {"image_size": 64}


def test_a_recorded_switch_can_be_turned_off_again(tmp_path):
    """--augment, --refit, --compile...: each has its --no- form, or a recorded `true` could never be undone."""
    _, path = _recorded(tmp_path, argv=[*RECORDED, "--augment", "--encoder-mode", "finetune", "--refit", "--compile"])
    again = config_from_command_line(TrainConfig, train_parser(), ["--config", path, "--out", "o"])
    assert (again.augment, again.refit, again.compile) == (True, True, True)
    off = config_from_command_line(TrainConfig, train_parser(),
                                   ["--config", path, "--out", "o", "--no-augment", "--no-refit", "--no-compile"])
    assert (off.augment, off.refit, off.compile, off.encoder_mode) == (False, False, False, "finetune")


def test_a_rerun_needs_its_own_out(tmp_path):
    _, path = _recorded(tmp_path)
    with pytest.raises(DataError, match=r"--out.*runs/first"):
        config_from_command_line(TrainConfig, train_parser(), ["--config", path, "--seed", "1"])


def test_a_config_of_another_command_names_the_settings_it_does_not_have(tmp_path):
    _, path = _recorded(tmp_path, ["--data", "captions", "--text-lr", "1e-5", "--out", "p"], pretrain_parser,
                        PretrainConfig)
    with pytest.raises(DataError, match=r"run_config\.json: .*text_lr.*another command"):
        config_from_command_line(TrainConfig, train_parser(), ["--config", path, "--out", "o"])
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(DataError, match=r"list\.json: expected a JSON object"):
        config_from_command_line(TrainConfig, train_parser(), ["--config", str(tmp_path / "list.json"), "--out", "o"])
    with pytest.raises(DataError, match="missing.json: file not found"):
        config_from_command_line(TrainConfig, train_parser(), ["--config", str(tmp_path / "missing.json"), "--out", "o"])


def test_pretraining_reruns_from_its_record_too(tmp_path):
    first, path = _recorded(tmp_path, ["--data", "captions", "--text-lr", "1e-5", "--epochs", "3", "--out", "p"],
                            pretrain_parser, PretrainConfig)
    again = config_from_command_line(PretrainConfig, pretrain_parser(), ["--config", path, "--out", "q"])
    assert again == dataclasses.replace(first, out="q")


def test_the_bundles_record_names_no_local_folder_and_a_rerun_gives_them_again(tmp_path):
    """A bundle is shared: its run_config.json reduces this machine's paths to their names, and a rerun from it is
    refused until each is given again."""
    from vqa.training import shareable_config

    (tmp_path / "vqa-rad").mkdir()
    (tmp_path / "glove_300d.txt").write_text("the 0.1\n")
    first = TrainConfig(data=str(tmp_path / "vqa-rad"), glove=str(tmp_path / "glove_300d.txt"), answers="train",
                        encoder="clip-vit-tiny", cache_dir=str(tmp_path / "cache"), lr=0.004, out=str(tmp_path / "o"),
                        resume="latest")
    shared = shareable_config(first)
    assert (shared["data"], shared["glove"], shared["answers"], shared["encoder"]) == \
        ("local:vqa-rad", "local:glove_300d.txt", "train", "clip-vit-tiny")
    assert shared["cache_dir"] is None and not {"out", "resume", "stop_after", "progress"} & set(shared)
    assert str(tmp_path) not in json.dumps(shared)
    write_run_config(shared, tmp_path / "bundle")
    path = str(tmp_path / "bundle" / "run_config.json")
    with pytest.raises(DataError, match=r"--data \(it was 'vqa-rad'\), --glove \(it was 'glove_300d.txt'\)"):
        config_from_command_line(TrainConfig, train_parser(), ["--config", path, "--out", "mine"])
    again = config_from_command_line(TrainConfig, train_parser(), ["--config", str(tmp_path / "bundle"),  # its folder
                                                                   "--out", "mine", "--data", "d", "--glove", "g.txt"])
    assert again == dataclasses.replace(first, data="d", glove="g.txt", cache_dir=None, out="mine", resume=None)
    # a path after a prefix (local-dir:FOLDER), and one in --encoder-arg (open_clip's pretrained=FILE)
    (tmp_path / "biomedclip").mkdir()
    (tmp_path / "w.pt").write_bytes(b"")
    prefixed = dataclasses.replace(first, encoder=f"local-dir:{tmp_path / 'biomedclip'}",
                                   encoder_args={"pretrained": str(tmp_path / "w.pt"), "image_size": 224})
    shared = shareable_config(prefixed)
    assert str(tmp_path) not in json.dumps(shared)
    assert (shared["encoder"], shared["encoder_args"]) == ("local:biomedclip", {"pretrained": "local:w.pt",
                                                                                "image_size": 224})
    gone = shareable_config(dataclasses.replace(first, glove="/home/alice/moved/glove.txt", encoder="hf-hub:o/n"))
    assert (gone["glove"], gone["encoder"]) == ("local:glove.txt", "hf-hub:o/n")  # absolute: a path even if gone
    write_run_config(shared, tmp_path / "other")
    given = ["--config", str(tmp_path / "other" / "run_config.json"), "--out", "m", "--data", "d", "--glove", "g"]
    with pytest.raises(DataError, match=r"--encoder \(it was 'biomedclip'\), --encoder-arg pretrained=\.\.\. "
                                        r"\(it was 'w.pt'\)"):
        config_from_command_line(TrainConfig, train_parser(), given)
    again = config_from_command_line(TrainConfig, train_parser(),
                                     [*given, "--encoder", "e", "--encoder-arg", "pretrained=mine.pt"])
    assert (again.encoder, again.encoder_args) == ("e", {"pretrained": "mine.pt", "image_size": 224})


@pytest.mark.slow  # two training runs: end to end, left out of the fast lane
def test_a_recorded_training_run_reruns_to_the_same_model(phantom_dir, tmp_path):
    """End to end: the rerun from the first run's record trains the same weights, epoch for epoch."""
    first, again = tmp_path / "first", tmp_path / "again"
    assert cli(["train", "--format", "vqa-rad", "--data", str(phantom_dir / "vqa-rad"), "--head", "mevf-san",
                "--embed-dim", "32", "--question-dim", "32", "--head-arg", "hidden_dim=32", "--epochs", "3",
                "--batch-size", "16", "--threads", "1", "--cache-dir", str(tmp_path / "cache"), "--out", str(first),
                "--no-progress"]) == 0
    assert cli(["train", "--config", str(first / "run_config.json"), "--out", str(again)]) == 0
    assert json.loads((again / "run_config.json").read_text()) == \
        {**json.loads((first / "run_config.json").read_text()), "out": str(again), "progress": True}
    shared = json.loads((first / "bundle" / "run_config.json").read_text())  # the recipe travels with the model
    assert shared["data"] == "local:vqa-rad" and shared["head"] == "mevf-san" and "out" not in shared
    loss = [[row["loss"] for row in json.loads((run / "history.json").read_text())] for run in (first, again)]
    assert loss[0] == loss[1] and len(loss[0]) == 3
    weights = [load_file(str(run / "bundle" / "model.safetensors")) for run in (first, again)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_every_setting_a_config_records_has_its_flag():
    """What --config can set, the command line can set too (a field without a flag could only come from a file)."""
    from pretrain import PretrainConfig
    from pretrain.classify import ClassifyConfig
    from vqa.cli.classify import build_parser as classify_parser
    from vqa.cli.pretrain import build_parser as pretrain_parser

    # flags spelled otherwise: --encoder-arg K=V, --head-arg, --text-arg, --no-progress; and checkpoint_every,
    # which only pretraining's mid-epoch resume takes (the others' engines refuse it)
    spelled = {"encoder_args": "encoder_arg", "head_args": "head_arg", "text_args": "text_arg",
               "progress": "no_progress"}
    for cls, parser, absent in ((TrainConfig, train_parser(), {"checkpoint_every"}),
                                (PretrainConfig, pretrain_parser(), set()),
                                (ClassifyConfig, classify_parser(), {"checkpoint_every"})):
        dests = {a.dest for a in parser._actions}
        missing = {f.name for f in dataclasses.fields(cls) if spelled.get(f.name, f.name) not in dests}
        assert missing == absent, (cls.__name__, missing)
