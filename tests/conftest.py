"""Shared fixtures: a small phantom dataset generated once per test session."""
from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

# Never reach for a hub from tests: fail fast and offline.
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
# ... nor for the user's hub and datasets caches (a model cached there would load; datasets would write there):
# set before anything imports huggingface_hub or datasets, which read them once
_HF_CACHES = tempfile.mkdtemp(prefix="medvqa-tests-hf-")
atexit.register(shutil.rmtree, _HF_CACHES, ignore_errors=True)
os.environ["HF_HUB_CACHE"] = os.path.join(_HF_CACHES, "hub")
os.environ["HF_DATASETS_CACHE"] = os.path.join(_HF_CACHES, "datasets")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


# The longest tests first (in this order), so that with two workers (`make test` runs `pytest -n 2`) both
# finish at about the same time: each of these takes 5-100 s, most others under a second. xdist hands each worker
# two tests to start with, then one more each time it finishes one. So the first worker gets the first two (the
# first builds the world the learning tests share, built_once; the second waits for it) and the other worker the
# next four, which need no world and keep it busy for about as long as the build takes.
RUN_FIRST = ("test_vqa_learning.py::test_each_head_beats_the_majority_baseline[qcr]",
             "test_vqa_learning.py::test_each_head_beats_the_majority_baseline[minilm-question-encoder]",
             "test_shards.py::test_two_processes_match_one_on_shards_and_resume_on_another_world_size",
             "test_shipped_model.py::test_small_bundle_answers_like_the_full_one",
             "test_pretrain_ddp.py::test_two_nodes_of_two_processes_match_one_on_the_same_global_batch",
             "test_demo_app.py::test_build_demo_without_launch",  # builds the predictor tests' bundle
             "test_vqa_learning.py::test_each_head_beats_the_majority_baseline[fusion-transformer]",
             "test_vqa_learning.py::test_each_head_beats_the_majority_baseline[mevf-ban]",
             "test_vqa_learning.py::test_each_head_beats_the_majority_baseline[mevf-san]",
             "test_vqa_learning.py::test_each_head_beats_the_majority_baseline[qcr-code-loss]",
             "test_vqa_learning.py::test_multiple_choice_beats_chance",
             "test_heads_learning.py::test_head_learns_a_synthetic_task[fusion-transformer]",
             "test_heads_learning.py::test_head_learns_a_synthetic_task[fusion-transformer-qcr]",
             "test_heads_learning.py::test_head_learns_a_synthetic_task[fusion-transformer-mc]",
             "test_transfer.py::test_the_packaged_minilm_frozen_as_question_encoder",
             "test_ensemble.py::test_an_ensemble_is_its_members_mean_distribution_calibrated_on_their_validation",
             "test_ensemble.py::test_bagging_calibrates_each_carve_on_the_members_held_out_on_it_together",
             "test_ensemble.py::test_a_bagging_ensemble_joins_members_of_different_carves",
             "test_engine.py::test_head_training_two_processes_match_one_on_the_same_global_batch",
             "test_cache_shards.py::test_two_processes_write_the_cache_that_one_process_writes",
             # The fast lane (`make test-fast` deselects the slow tests above; the bundle build comes first):
             # one worker builds the bundle the predictor, CLI and demo tests share, then learns a head; the
             # other builds the phantom CLIP, then runs the rest of this list, none of which needs the bundle,
             # so that neither sits waiting on the other's build.
             "test_heads_learning.py::test_head_learns_a_synthetic_task[qcr]",
             "test_classify.py::test_probe_and_zero_shot_beat_the_majority_class",
             "test_heads_learning.py::test_head_learns_a_synthetic_task[mc-ban]",
             "test_heads_learning.py::test_head_learns_a_synthetic_task[mevf-ban]",
             "test_transfer.py::test_a_built_text_tower_as_question_encoder_travels_in_the_bundle",
             "test_transfer.py::test_weight_averaging_is_what_is_scored_kept_and_resumed",
             "test_transfer.py::test_augmentation_is_seeded_and_never_flips",
             "test_engine.py::test_finetuned_bundle_keeps_the_best_epochs_encoder_and_head")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under `make test` (MEDVQA_TESTS_NEED_EXTRAS=1, after `make install` put every optional package in place) a
    test skipped because a package could not be imported fails instead: CI must not go green on a broken install."""
    outcome = yield
    report = outcome.get_result()
    if (report.skipped and call.excinfo is not None and os.environ.get("MEDVQA_TESTS_NEED_EXTRAS")
            and str(call.excinfo.value).startswith("could not import")):
        report.outcome, report.longrepr = "failed", f"{call.excinfo.value} (installed by `make install`)"


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        return next((i for i, key in enumerate(RUN_FIRST) if key in item.nodeid), len(RUN_FIRST))

    items.sort(key=rank)  # stable: the rest keep pytest's order


@pytest.fixture(scope="session", autouse=True)
def own_cache_root(tmp_path_factory):
    """Feature caches, the demo's model and examples under this run's folder, shared by its xdist workers, never
    the user's ~/.cache/medvqa: a test must pass from an empty cache, not from rows an earlier run left there."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the run's folder, above the workers'
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEDVQA_CACHE", str(shared / "medvqa-cache"))
        yield


@pytest.fixture(autouse=True)
def one_thread():
    """Every test on one intra-op thread: the models are small, so one thread is as fast, and immune to the
    several-fold slowdown that OpenMP spin-waits cause when another job shares the 2 cores; and the numbers
    do not depend on the machine's core count."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rank(rank: int, world: int, port: int, fn, config, environ: dict) -> None:
    os.environ.clear()
    os.environ.update(environ)  # the caller's, as now (the forkserver's copy is from when it started)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    import torch

    torch.set_num_threads(1)
    fn(config)


# What the ranks of every spawn_ranks call import, loaded once into the forkserver they fork from: spawned fresh,
# each rank spent ~7 s importing them again (about 1 min of the suite's 2 cores, over its 4 multi-process tests).
_RANK_MODULES = ["torch", "timm", "transformers", "tests.conftest", "encoders", "pretrain", "vqa.train",
                 "pretrain.shard_features"]


def spawn_ranks(fn, config, world: int = 2) -> None:
    """Run `fn(config)` in `world` processes on this machine as torchrun would (gloo on the CPU)."""
    import multiprocessing

    import torch.multiprocessing as mp

    # Forked from a server that has only imported modules (no threads, no torch state yet), as spawned processes
    # start; the preload list takes effect when this worker's first call starts the server.
    multiprocessing.set_forkserver_preload(_RANK_MODULES)
    mp.start_processes(_rank, args=(world, free_port(), fn, config, dict(os.environ)), nprocs=world, join=True,
                       start_method="forkserver")


def built_once(tmp_path_factory, name: str, build) -> Path:
    """A folder that `build(folder)` fills once per test run, by whichever xdist worker asks first (the other
    waits for it instead of building it again); each worker gets its own copy, so tests may write into it.
    The build runs on one thread: session fixtures start before `one_thread`, and on 2 cores shared with the
    other worker two OpenMP threads make these tiny steps 10-100x slower."""
    import torch
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the run's folder, above the workers'
    done = shared / f"{name}.built"
    with FileLock(str(shared / f"{name}.lock")):
        if not done.is_dir():
            partial = shared / f"{name}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                build(partial)
            finally:
                torch.set_num_threads(threads)
            partial.rename(done)  # a build that failed leaves no folder that looks finished
    local = tmp_path_factory.mktemp(name)
    shutil.copytree(done, local, dirs_exist_ok=True)
    return local


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """60 phantom images in every format (seed 0)."""
    from vqa.phantom import generate_phantom

    out = tmp_path_factory.mktemp("phantom") / "p"
    generate_phantom(out, n_images=60, seed=0, workers=0)
    return out


@pytest.fixture(scope="session")
def phantom_truth(phantom_dir) -> list[dict]:
    """The generator's ground truth, one dict per image."""
    with open(phantom_dir / "phantom.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def shared_data(name: str) -> Path:
    """A folder of ../shared/data, or skip the test when it is absent (CI without real data)."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real data not available: {path}")
    return path


# -- a small trained bundle, shared by the predictor, CLI and demo tests (trained once) ----------
@pytest.fixture(scope="session")
def trained_bundle(tmp_path_factory) -> Path:
    from ._bundle import build_test_bundle, built_bundle

    return built_bundle(built_once(tmp_path_factory, "predictor", build_test_bundle))


@pytest.fixture(scope="session")
def predictor_phantom(trained_bundle) -> Path:
    from ._bundle import bundle_phantom

    return bundle_phantom(trained_bundle)


@pytest.fixture(scope="session")
def predictor(trained_bundle):
    from vqa import Predictor

    return Predictor.from_bundle(trained_bundle)


# -- the Gradio demo over that bundle, launched on localhost once ------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def demo_examples(predictor_phantom):
    """A few held-out phantom images as the gallery (the default examples live in the user's cache)."""
    from demos.examples import Example
    from ._bundle import ground_truth

    paths = list(dict.fromkeys(r["image"] for r in ground_truth(predictor_phantom)))[:4]
    return [Example(p, f"example {i}", {}) for i, p in enumerate(paths)]


@pytest.fixture(scope="session")
def launched_demo(predictor, demo_examples):
    """(demo, url): the app on 127.0.0.1, launched without blocking; closed at the end of the session."""
    from demos.app import build_demo

    demo = build_demo(predictor, examples=demo_examples)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield demo, f"http://127.0.0.1:{port}/"
    demo.close()


# -- a small CLIP pretrained on phantom captions (zero-shot classification and multiple choice) -------------
@pytest.fixture(scope="session")
def phantom_clip(tmp_path_factory) -> tuple[Path, Path]:
    """(phantom folder, pretraining run): 240 phantom images (seed 1) and a small CNN + word-level text tower
    CLIP-pretrained on their 168 training captions for 10 epochs at 64 px (~10 s on one thread); the run's
    clip/ and encoder/ are what `medvqa classify` and `medvqa eval --zero-shot-clip` read."""
    def build(root: Path) -> None:
        from pretrain import PretrainConfig, pretrain
        from vqa.phantom import generate_phantom

        generate_phantom(root / "phantom", n_images=240, seed=1, workers=0)
        pretrain(PretrainConfig(
            data=str(root / "phantom" / "captions"), encoder="timm:resnet10t",
            encoder_args={"image_size": 64, "model_kwargs": {"channels": [16, 32, 64, 128], "stem_width": 16}},
            augment=True, epochs=10, lr=2e-3, batch_size=32, embed_dim=64, val_split="none",
            out=str(root / "pretrain"), progress=False, seed=0))

    root = built_once(tmp_path_factory, "phantom-clip", build)
    return root / "phantom", root / "pretrain"
