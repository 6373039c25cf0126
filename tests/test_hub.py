"""Bundles on the Hugging Face Hub, offline: push into a hub cache, load by repository id, the upload calls."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ._bundle import ground_truth
from vqa.cli import main
from vqa.errors import DataError

REPO = "test-org/qcr-phantom"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache that huggingface_hub reads (HF_HUB_CACHE; the tests run with HF_HUB_OFFLINE=1)."""
    import huggingface_hub.constants

    assert huggingface_hub.constants.HF_HUB_OFFLINE  # never reach for the Hub from tests
    cache = tmp_path / "hub-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # read at import time
    return cache


@pytest.fixture
def bundle_copy(trained_bundle, tmp_path):
    """The session's bundle, copied: pushing rewrites its model card."""
    return shutil.copytree(trained_bundle, tmp_path / "bundle")


def test_a_folder_resolves_to_itself_and_bad_names_are_one_line_errors(trained_bundle, tmp_path, hub_cache,
                                                                      monkeypatch):
    from vqa.hub import is_repo_id, resolve_bundle

    assert resolve_bundle(trained_bundle) == trained_bundle and not is_repo_id(trained_bundle)
    assert is_repo_id("org/name") and not is_repo_id("runs/x/bundle/") and not is_repo_id("../x")
    with pytest.raises(DataError, match="bundle folder not found"):
        resolve_bundle(tmp_path / "nope")
    with pytest.raises(DataError, match="nobody/nothing: no local folder of that name, and not in the Hugging Face "
                                        "cache .*HF_HUB_OFFLINE"):
        resolve_bundle("nobody/nothing")
    monkeypatch.chdir(tmp_path)  # runs/ here: runs/qcr is a local run not finished (or mistyped), never a Hub id
    (tmp_path / "runs").mkdir()
    assert not is_repo_id("runs/qcr") and is_repo_id("nobody/nothing")
    with pytest.raises(DataError, match="runs/qcr: bundle folder not found"):
        resolve_bundle("runs/qcr")


def test_push_into_a_hub_cache_then_every_command_loads_it_by_id(bundle_copy, predictor, predictor_phantom,
                                                                 hub_cache, capsys, monkeypatch):
    from huggingface_hub import ModelCard

    from vqa import Predictor

    # what killed writes leave: a temporary file, and a temporary folder (an export or eval cut short), at any depth
    (bundle_copy / ".calibration.json.k3j2.tmp").write_text("{")
    for partial in (bundle_copy / ".onnx.ab12cd34.tmp", bundle_copy / "encoder" / ".eval-test.x9.tmp" / "deep"):
        partial.mkdir(parents=True)
        (partial / "head.onnx").write_bytes(b"half")
    (bundle_copy / "eval-vqa-rad-test").mkdir(exist_ok=True)  # what `medvqa eval` writes: its per-question file
    (bundle_copy / "eval-vqa-rad-test" / "predictions.jsonl").write_text('{"question": "private?"}\n')
    assert main(["push", str(bundle_copy), REPO, "--to-cache", str(hub_cache)]) == 0
    assert REPO in capsys.readouterr().out
    repo = hub_cache / "models--test-org--qcr-phantom"
    snapshot = repo / "snapshots" / (repo / "refs" / "main").read_text()
    assert (snapshot / "model.safetensors").is_file() and (snapshot / "encoder" / "config.json").is_file()
    assert not [p for p in snapshot.rglob("*") if ".tmp" in p.as_posix()]
    assert not list(snapshot.rglob("predictions.jsonl"))  # left out unless asked for
    from huggingface_hub.utils import filter_repo_objects

    from vqa.hub import UPLOAD_IGNORE

    leftovers = [".a.b.tmp", "x/.a.b.tmp", ".onnx.ab.tmp/head.onnx", "encoder/.e.x.tmp/deep/head.onnx"]
    assert list(filter_repo_objects(leftovers + ["onnx/head.onnx"], ignore_patterns=UPLOAD_IGNORE)) == [
        "onnx/head.onnx"]  # the Hub's own filter, as a real upload applies it
    from vqa.hub import PREDICTIONS

    evaluated = ["eval-vqa-rad-test/predictions.jsonl", "eval-vqa-rad-test/metrics.json"]
    assert list(filter_repo_objects(evaluated, ignore_patterns=UPLOAD_IGNORE + PREDICTIONS)) == [evaluated[1]]
    assert list(filter_repo_objects(evaluated, ignore_patterns=UPLOAD_IGNORE)) == evaluated  # --with-predictions
    assert ModelCard.load(snapshot / "README.md").data.model_name == REPO
    # the recipe travels too: `train --config` takes the Hub id, and asks for the data folder it recorded by name
    from vqa.cli.options import config_from_command_line
    from vqa.cli.train import build_parser
    from vqa.target_risk import TargetRisk
    from vqa.train import TrainConfig

    assert f"medvqa train --config {REPO} --data" in (snapshot / "README.md").read_text()
    with pytest.raises(DataError, match=r"--data \(it was 'vqa-rad'\)"):
        config_from_command_line(TrainConfig, build_parser(), ["--config", REPO, "--out", "o"])
    again = config_from_command_line(TrainConfig, build_parser(), ["--config", REPO, "--out", "o", "--data", "d"])
    assert (again.head, again.epochs, again.data) == ("qcr", 20, "d")
    assert TargetRisk.parse(again.target_risk).of("CLOSED") == 0.3

    rows = ground_truth(predictor_phantom)[:12]
    images, questions = [r["image"] for r in rows], [r["question"] for r in rows]
    pulled = Predictor.from_pretrained(REPO)
    assert [p.to_dict() | {"ms": 0} for p in pulled.predict_batch(images, questions)] == \
           [p.to_dict() | {"ms": 0} for p in predictor.predict_batch(images, questions)]

    row = rows[0]
    assert main(["predict", "--bundle", REPO, "--image", str(row["image"]), "--question", row["question"],
                 "--threads", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["answer"] == predictor.predict(row["image"], row["question"]).answer

    served = {}
    import demos.app

    class _Demo:  # launched and blocking in real use; here only what `medvqa demo` calls
        share_url = None

        def block_thread(self):
            pass

    def build_demo(predictor):
        served["predictor"] = predictor
        return _Demo()

    monkeypatch.setattr(demos.app, "build_demo", build_demo)
    monkeypatch.setattr(demos.app, "launch", lambda *a, **k: None)
    assert main(["demo", "--bundle", REPO, "--port", "1", "--threads", "1"]) == 0
    assert served["predictor"].predict(row["image"], row["question"]).answer == pulled.predict(
        row["image"], row["question"]).answer


def test_eval_takes_a_hub_id_and_writes_outside_the_cache(bundle_copy, predictor_phantom, hub_cache, tmp_path,
                                                         capsys):
    from vqa.cli.eval import default_out
    from vqa.hub import CacheHub, push_bundle

    push_bundle(bundle_copy, REPO, hub=CacheHub(hub_cache))
    assert default_out(REPO, "vqa-rad", "test").as_posix() == "runs/test-org--qcr-phantom/eval-vqa-rad-test"
    assert default_out(str(bundle_copy), "slake", "test") == bundle_copy / "eval-slake-test"
    out = tmp_path / "eval"
    assert main(["eval", "--bundle", REPO, "--format", "vqa-rad", "--data", str(predictor_phantom / "vqa-rad"),
                 "--out", str(out), "--no-progress", "--threads", "1", "--device", "cpu"]) == 0
    capsys.readouterr()
    report = json.loads((out / "metrics.json").read_text())
    assert report["bundle"] == REPO and report["subsets"]["all"]["n"] > 0


class RecordingHub:
    """huggingface_hub.HfApi's two upload calls, recorded."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, *, private=None, exist_ok=False):
        self.calls.append(("create_repo", repo_id, {"private": private, "exist_ok": exist_ok}))

    def upload_folder(self, *, repo_id, folder_path, commit_message=None, ignore_patterns=None):
        self.calls.append(("upload_folder", repo_id, {"commit_message": commit_message}))
        self.folder = Path(folder_path)
        self.uploaded = {p.relative_to(self.folder).as_posix(): p.read_bytes() for p in self.folder.rglob("*")
                         if p.is_file()}
        return "https://huggingface.co/test-org/qcr-phantom/commit/0"


def test_push_creates_the_repository_and_uploads_the_folder_with_its_card(bundle_copy):
    from huggingface_hub import ModelCard

    from vqa.hub import push_bundle

    hub = RecordingHub()
    assert push_bundle(bundle_copy, REPO, private=True, commit_message="first", hub=hub).endswith("/commit/0")
    assert hub.calls == [("create_repo", REPO, {"private": True, "exist_ok": True}),
                         ("upload_folder", REPO, {"commit_message": "first"})]
    assert ModelCard.load(bundle_copy / "README.md").data.model_name == REPO
    # the folder uploaded is a copy, every file of the bundle byte for byte (it records no local path), gone after
    assert hub.uploaded == {p.relative_to(bundle_copy).as_posix(): p.read_bytes() for p in bundle_copy.rglob("*")
                            if p.is_file()}
    assert hub.folder != bundle_copy and not hub.folder.exists() and not list(bundle_copy.parent.glob(".*.tmp"))


def test_pushing_a_hub_snapshot_leaves_the_cache_as_it_was(bundle_copy, tmp_path):
    """A bundle pulled from the Hub is a snapshot of links into the cache's blobs: pushing it (to another repository)
    writes the new card into what is uploaded, never through or over the cache's files."""
    from vqa.hub import push_bundle

    blob = tmp_path / "blobs" / "card"
    blob.parent.mkdir()
    blob.write_text((bundle_copy / "README.md").read_text())
    (bundle_copy / "README.md").unlink()
    (bundle_copy / "README.md").symlink_to(blob)
    before = blob.read_text()
    hub = RecordingHub()
    push_bundle(bundle_copy, "other-org/copy", hub=hub)
    assert (bundle_copy / "README.md").is_symlink() and blob.read_text() == before
    assert "other-org/copy" in hub.uploaded["README.md"].decode() and "other-org/copy" not in before


def test_what_is_uploaded_names_no_folder_of_this_machine(bundle_copy, trained_bundle, predictor_phantom, tmp_path):
    from vqa.bundle import load
    from vqa.evaluate import evaluate, write_outputs
    from vqa.hub import push_bundle
    from vqa.model_card import write_model_card

    from ._bundle import feature_cache_copy

    data = (predictor_phantom / "vqa-rad").resolve()
    report, records, preds = evaluate(bundle_copy.resolve(), "vqa-rad", str(data), device="cpu", progress=False,
                                      cache_dir=str(feature_cache_copy(trained_bundle, tmp_path / "cache")))
    write_outputs(report, records, preds, bundle_copy / "eval-vqa-rad-test")
    encoder = json.loads((bundle_copy / "encoder" / "config.json").read_text())
    encoder["name"] = "local-dir:/home/alice/private/biomedclip"  # as a tower loaded from a folder is named
    (bundle_copy / "encoder" / "config.json").write_text(json.dumps(encoder))
    # a card written for the bundle where it lies names its folder; an ONNX export of earlier versions copied it
    write_model_card(bundle_copy.resolve())
    (bundle_copy / "onnx").mkdir()
    shutil.copy(bundle_copy / "README.md", bundle_copy / "onnx" / "README.md")
    hub = RecordingHub()
    push_bundle(bundle_copy, REPO, hub=hub)
    assert "onnx/README.md" not in hub.uploaded and str(bundle_copy.resolve()) not in hub.uploaded["README.md"].decode()
    shared = json.loads(hub.uploaded["eval-vqa-rad-test/metrics.json"])
    assert (shared["bundle"], shared["data"]) == (f"local:{bundle_copy.name}", "local:vqa-rad")
    assert json.loads(hub.uploaded["encoder/config.json"])["name"] == "local:biomedclip"
    assert "eval-vqa-rad-test/predictions.jsonl" not in hub.uploaded
    for name, content in hub.uploaded.items():
        assert str(tmp_path) not in content.decode("utf-8", "replace") and b"/home/alice" not in content, name
    # the bundle itself is untouched, and its copy as uploaded loads to the same weights
    assert json.loads((bundle_copy / "eval-vqa-rad-test" / "metrics.json").read_text())["data"] == str(data)
    assert "`local:biomedclip` image encoder" in hub.uploaded["README.md"].decode()
    shared_copy = tmp_path / "as-uploaded"
    for name, content in hub.uploaded.items():
        (shared_copy / name).parent.mkdir(parents=True, exist_ok=True)
        (shared_copy / name).write_bytes(content)
    pulled, here = load(shared_copy), load(bundle_copy)
    assert all(torch.equal(a, b) for a, b in zip(pulled.model.state_dict().values(), here.model.state_dict().values()))


def test_the_shared_copy_reduces_paths_only_where_settings_name_them(tmp_path, monkeypatch):
    from vqa.hub import shared_copy

    source = tmp_path / "bundle"
    files = {
        "config.json": {"head": {"question_encoder": {"config": {"_name_or_path": "/home/alice/.venv/minilm"}}},
                        "encoder": {"name": "efficientnet-lite0-imagenet"}},
        "tokenizer/tokenizer_config.json": {"name_or_path": "C:\\Users\\alice\\minilm",
                                            "tokenizer_file": "/home/alice/.cache/tok/tokenizer.json"},
        "metrics.json": {"members": [{"bundle": "/home/alice/runs/s0/bundle"}, {"bundle": "runs/s1/bundle"}]},
        "tokenizer/tokenizer.json": {"model": {"vocab": {"/home/alice": 1}}, "name": "/home/alice"},  # words
        "vocab.json": {"name": "/usr"},
        "encoder/config.json": {"name": "hf-hub:org/clip", "config": {"source": "local-dir:~/biomedclip",
                                                                         "hub_id": "org/clip"}},
        "eval-x/metrics.json": {"bundle": "runs/qcr/bundle", "dataset": "hf", "data": "hf-org/slake", "subsets": {}},
        "eval-x/report.md": "# slake test: `runs/qcr/bundle`\nrows\n",  # from a report older than today's renderer
        "eval-x/predictions.jsonl": "{}",
        "eval-y/metrics.json": {"bundle": ".", "dataset": "slake", "data": "../../alice/data/slake", "subsets": {}},
        "eval-z/metrics.json": {"bundle": "org/qcr", "dataset": "vqa-rad", "data": "C:\\Users\\alice\\vqa-rad"},
        "eval-w/metrics.json": {"bundle": "C:\\runs\\qcr", "dataset": "vqa-rad", "data": "data/vqa-rad"},
    }
    for name, content in files.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text(content if isinstance(content, str) else json.dumps(content))
    (source / "model.safetensors").write_bytes(b"weights")
    from safetensors import safe_open
    from safetensors.torch import save_file

    (source / "ood_encoder").mkdir()
    save_file({"mean": torch.ones(3)}, str(source / "ood.safetensors"),  # a detector an earlier version fitted
              metadata={"format": "pt", "space": "local-dir:/home/alice/private/clip"})
    monkeypatch.chdir(tmp_path)
    (tmp_path / "efficientnet-lite0-imagenet").mkdir()  # a registered name is not a path because a folder has it
    (tmp_path / "runs" / "qcr" / "bundle").mkdir(parents=True)  # an eval report's relative path that exists here
    out = shared_copy(source, tmp_path / "shared", ["eval-*/predictions.jsonl"])

    def read(name):
        return json.loads((out / name).read_text())

    assert read("config.json")["head"]["question_encoder"]["config"]["_name_or_path"] == "local:minilm"
    assert read("config.json")["encoder"]["name"] == "efficientnet-lite0-imagenet"
    assert read("tokenizer/tokenizer_config.json") == {"name_or_path": "local:minilm",
                                                       "tokenizer_file": "local:tokenizer.json"}
    assert read("metrics.json") == {"members": [{"bundle": "local:bundle"}, {"bundle": "runs/s1/bundle"}]}
    assert read("tokenizer/tokenizer.json") == files["tokenizer/tokenizer.json"]  # words, not settings
    assert read("vocab.json") == {"name": "/usr"}
    assert read("encoder/config.json") == {"name": "hf-hub:org/clip", "config": {"source": "local:biomedclip",
                                                                                 "hub_id": "org/clip"}}
    assert read("eval-x/metrics.json") == {"bundle": "local:bundle", "dataset": "hf", "data": "hf-org/slake",
                                           "subsets": {}}
    assert (out / "eval-x" / "report.md").read_text() == "# slake test: `local:bundle`\nrows\n"
    # a report's paths name no folder wherever push runs: "." is the folder it named, a relative path its name
    assert read("eval-y/metrics.json") == {"bundle": f"local:{tmp_path.name}", "dataset": "slake",
                                           "data": "local:slake", "subsets": {}}
    # a Hub bundle stays named; a Windows folder, or a relative one a local format reads, is its last name
    assert read("eval-z/metrics.json") == {"bundle": "org/qcr", "dataset": "vqa-rad", "data": "local:vqa-rad"}
    assert read("eval-w/metrics.json") == {"bundle": "local:qcr", "dataset": "vqa-rad", "data": "local:vqa-rad"}
    assert not (out / "eval-x" / "predictions.jsonl").exists()
    assert (out / "model.safetensors").stat().st_ino == (source / "model.safetensors").stat().st_ino  # linked
    with safe_open(str(out / "ood.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt", "space": "local:clip"}
        assert torch.equal(f.get_tensor("mean"), torch.ones(3))


def test_push_refuses_a_broken_bundle_and_a_bad_repo_id(bundle_copy):
    from vqa.hub import push_bundle

    (bundle_copy / "vocab.json").unlink()
    with pytest.raises(DataError, match="missing vocab.json"):
        push_bundle(bundle_copy, REPO, hub=RecordingHub())
    with pytest.raises(DataError, match="org/name"):
        push_bundle(bundle_copy, "not a repo id", hub=RecordingHub())


def test_offline_upload_is_a_one_line_error(bundle_copy, capsys):
    assert main(["push", str(bundle_copy), REPO]) == 2  # the real HfApi, with HF_HUB_OFFLINE=1
    assert "HF_HUB_OFFLINE=1 forbids uploads" in capsys.readouterr().err
