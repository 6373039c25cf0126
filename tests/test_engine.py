"""The training engine: best-epoch state, one inference path, DDP head training, non-finite runs, trainable state."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from vqa.bundle import load as load_bundle
from vqa.errors import DataError
from vqa.train import TrainConfig, evaluate_split, load_splits, make_split, train
from vqa.training import NonFiniteError
from vqa.training.task import trainable_state_keys

from .conftest import spawn_ranks

TINY = dict(encoder="clip-vit-tiny", head_args={"hidden_dim": 32}, question_dim=32, embed_dim=16, batch_size=32,
            progress=False, device="cpu")


def _cfg(phantom_dir, tmp_path, **kw) -> TrainConfig:
    return TrainConfig(**{**TINY, "data": str(phantom_dir / "vqa-rad"), "cache_dir": str(tmp_path / "cache"),
                          "out": str(tmp_path / "run"), "epochs": 2, **kw})


def _without_epoch(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "epoch"}


def test_finetuned_bundle_keeps_the_best_epochs_encoder_and_head(phantom_dir, tmp_path):
    # A high learning rate makes validation peak before the last epoch (measured: best 4 of 6).
    cfg = _cfg(phantom_dir, tmp_path, encoder_mode="finetune", epochs=6, lr=5e-2, val_fraction=0.3)
    bundle_path = train(cfg)
    metrics = json.loads((bundle_path / "metrics.json").read_text())
    history, best = metrics["history"], metrics["validation"]
    assert best["epoch"] < len(history), "precondition: the best validation epoch must not be the last"
    assert history[-1]["val_overall"] != best["overall"], "precondition: the last epoch must score differently"
    bundle = load_bundle(bundle_path)
    _, val_records, _ = load_splits(cfg)
    val = make_split(cfg, bundle.model, val_records, bundle.tokenizer, bundle.answers, torch.device("cpu"))
    again = evaluate_split(bundle.model, val, bundle.answers, torch.device("cpu"), "fp32")
    assert again == _without_epoch(best)  # the best epoch's encoder *and* head, exactly
    # weight by weight: the bundle's encoder is the best epoch's, not the last epoch's
    checkpoint = torch.load(bundle_path.parent / "checkpoint.pt", weights_only=True)
    saved = bundle.model.encoder.state_dict()
    best_state = {k[len("encoder."):]: v for k, v in checkpoint["best_state"].items() if k.startswith("encoder.")}
    last_state = {k[len("encoder."):]: v for k, v in checkpoint["model"].items() if k.startswith("encoder.")}
    assert best_state.keys() == saved.keys()
    assert all(torch.equal(saved[k], best_state[k]) for k in saved)
    assert not all(torch.equal(saved[k], last_state[k]) for k in saved)


def test_the_epoch_reports_the_share_spent_waiting_for_input(phantom_dir, tmp_path, monkeypatch):
    import time

    from vqa.train import VQATask

    def wait_share(bundle) -> float:
        return json.loads((bundle / "metrics.json").read_text())["history"][0]["input_wait_share"]

    plain = wait_share(train(_cfg(phantom_dir, tmp_path / "plain", epochs=1)))
    steps = VQATask.train_steps

    def slow_input(self, epoch):  # an input pipeline 50 ms behind every step
        for item in steps(self, epoch):
            time.sleep(0.05)
            yield item

    monkeypatch.setattr(VQATask, "train_steps", slow_input)
    slowed = wait_share(train(_cfg(phantom_dir, tmp_path / "slow", epochs=1)))
    assert 0 <= plain < slowed <= 1
    assert slowed > 0.3  # the tiny head's step takes a few ms: most of this epoch is the 50 ms waits


def test_pooled_bundle_answers_the_same_through_eval_predict_and_the_predictor(phantom_dir, tmp_path):
    from vqa import Predictor
    from vqa.cli import main as cli
    from vqa.data import load_vqa_rad
    from vqa.evaluate import evaluate, write_outputs

    bundle = train(_cfg(phantom_dir, tmp_path, image_features="pooled", head="qcr",
                        head_args={"hidden_dim": 32, "type_hidden": [16]}))
    data = str(phantom_dir / "vqa-rad")
    report, records, preds = evaluate(bundle, "vqa-rad", data, device="cpu", cache_dir=str(tmp_path / "cache"),
                                      progress=False)
    lines = (write_outputs(report, records, preds, tmp_path / "eval") / "predictions.jsonl").read_text().splitlines()
    from_eval = [(row["prediction"], row["score"]) for row in map(json.loads, lines)]

    records = load_vqa_rad(data, "test")
    predictor = Predictor.from_bundle(bundle)
    direct = predictor.predict_batch([r.image for r in records], [r.question for r in records])
    assert [(p.answer, round(p.score, 6)) for p in direct] == from_eval

    batch = tmp_path / "questions.jsonl"
    batch.write_text("".join(json.dumps({"image": str(r.image), "question": r.question}) + "\n" for r in records))
    assert cli(["predict", "--bundle", str(bundle), "--batch", str(batch), "--out", str(tmp_path / "a.jsonl")]) == 0
    answered = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [(row["answer"], row["score"]) for row in answered] == from_eval
    one = predictor.predict(records[0].image, records[0].question)  # a batch of one: the same numbers
    assert (one.answer, round(one.score, 6)) == from_eval[0]
    assert one.attention_grid.shape == (1, 1)  # one region: the pooled vector


@pytest.mark.slow
@pytest.mark.parametrize("tuning", [
    {},
    # under SAN: BAN's attention-logit bias is inert, and its noise-driven moves differ with the batch split once
    # the encoder trains too (tests/test_refit.py)
    {"head": "mevf-san", "head_args": {"hidden_dim": 32, "dropout": 0.0, "classifier_dropout": 0.0},
     "encoder_mode": "finetune", "encoder_lr": 1e-4, "freeze_epochs": 1, "augment": True},
    {"feature_views": 2},
    # QCR's code loss: each answer branch's mean over the global batch's pairs, whatever mix of types a rank holds
    {"head": "qcr", "loss": "bce-mean"}],
    ids=["frozen", "fine-tuned-augmented-after-a-warm-start", "feature-views", "qcr-branch-means"])
def test_head_training_two_processes_match_one_on_the_same_global_batch(phantom_dir, tmp_path, tuning):
    """DDP: the same model as one process on the same global batch; fine-tuning feeds pixels through the wrapper,
    and its warm start leaves the encoder's parameters without gradients (DDP must look for them); what is drawn
    per sample (augmentation, a feature view) is drawn for the global batch, each rank taking its own samples'."""
    import dataclasses

    # no dropout, so the two runs differ only in how the global batch is split
    head_args = {"hidden_dim": 32, "dropout": 0.0, "attention_dropout": 0.0, "classifier_dropout": 0.0}
    base = _cfg(phantom_dir, tmp_path, **{"head_args": head_args, "epochs": 2, **tuning})
    single = train(dataclasses.replace(base, batch_size=24, out=str(tmp_path / "one")))
    spawn_ranks(train, dataclasses.replace(base, batch_size=12, out=str(tmp_path / "two")))
    h1 = json.loads((single.parent / "history.json").read_text())
    h2 = json.loads((tmp_path / "two" / "history.json").read_text())
    for a, b in zip(h1, h2):  # the last global batch of each epoch splits unevenly: weighted exactly
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    files = ["model.safetensors"] + (["encoder/model.safetensors"] if "encoder_mode" in tuning else [])  # as tuned
    for file in files:
        wa, wb = load_file(str(single / file)), load_file(str(tmp_path / "two" / "bundle" / file))
        assert wa.keys() == wb.keys()
        # a word-attention pool's score bias shifts every word's score before their softmax: its gradient is 0 up to
        # rounding, which Adamax's normalised steps turn into moves that differ with the batch split (QCR's pools)
        for key in [k for k in wa if not k.endswith("pool.score.bias")]:
            torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=2e-5, msg=f"{file}: {key}")


def test_reading_the_step_values_in_batches_changes_no_number(phantom_dir, tmp_path):
    # --sync-every 5: the losses and gradient norms stay on the device and are read five steps at a time
    each = train(_cfg(phantom_dir, tmp_path, out=str(tmp_path / "each"), sync_every=1))
    batched = train(_cfg(phantom_dir, tmp_path, out=str(tmp_path / "batched"), sync_every=5))
    h1, h5 = (json.loads((b.parent / "history.json").read_text()) for b in (each, batched))
    keys = ("loss", "grad_norm", "val_overall")
    assert [[row[k] for k in keys] for row in h1] == [[row[k] for k in keys] for row in h5]
    assert h1[0]["grad_norm"] > 0
    wa, wb = load_file(str(each / "model.safetensors")), load_file(str(batched / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sync_every_must_not_be_negative(phantom_dir, tmp_path):
    with pytest.raises(DataError, match="--sync-every must be 0 .* got -1"):
        train(_cfg(phantom_dir, tmp_path, sync_every=-1))


@pytest.mark.parametrize("sync_every,when", [(1, "stopped before any update from it"),
                                             (5, "stopped at the next read of the step values")])
def test_a_non_finite_loss_stops_training_and_writes_no_bundle(phantom_dir, tmp_path, sync_every, when):
    from encoders import create_encoder

    torch.manual_seed(0)
    encoder = create_encoder("clip-vit-tiny")
    with torch.no_grad():
        encoder.vision_model.post_layernorm.weight[0] = float("nan")  # every feature row holds a NaN
    encoder.save_pretrained(tmp_path / "nan-encoder")
    out = tmp_path / "nan-run"
    # frozen, its features are refused as the cache encodes them (float16 would keep the NaN for good)
    with pytest.raises(DataError, match="clip-vit-tiny: its grid features reach nan"):
        train(_cfg(phantom_dir, tmp_path, epochs=1, encoder=str(tmp_path / "nan-encoder"), out=str(out)))
    # fine-tuned, the NaN reaches the loss: the engine stops at the step that made it, or at the next read
    with pytest.raises(NonFiniteError, match=rf"epoch 1, step 1: loss is nan; {when}"):  # read late, still named
        train(_cfg(phantom_dir, tmp_path, epochs=1, encoder=str(tmp_path / "nan-encoder"), out=str(out),
                   encoder_mode="finetune", sync_every=sync_every))
    assert not (out / "bundle").exists() and not (out / "checkpoint.pt").exists()


def test_a_bundle_is_never_saved_from_non_finite_weights(phantom_dir, tmp_path):
    from vqa.bundle import save

    bundle = load_bundle(train(_cfg(phantom_dir, tmp_path, epochs=1)))
    with torch.no_grad():
        next(bundle.model.head.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(DataError, match="non-finite weights"):
        save(bundle.model, tmp_path / "nan-bundle", answers=bundle.answers, tokenizer=bundle.tokenizer)
    assert not (tmp_path / "nan-bundle").exists()


def test_trainable_state_is_what_training_can_change():
    from encoders import create_encoder

    encoder = create_encoder("mevf")  # BatchNorm: running statistics are buffers
    head = torch.nn.Linear(4, 2)
    model = torch.nn.ModuleDict({"encoder": encoder, "head": head})
    encoder.freeze()
    assert trainable_state_keys(model) == ["head.weight", "head.bias"]
    encoder.unfreeze()
    keys = trainable_state_keys(model)
    assert "encoder.maml.layers.0.norm.running_mean" in keys and "encoder.maml.layers.0.norm.weight" in keys
    assert set(keys) == set(model.state_dict())


_FAULTS_PER_STEP = """
import resource, statistics, torch
from vqa.training.runtime import keep_freed_memory
torch.set_num_threads(1)

def faults():  # what a training step does with its activations: 64 MB allocated, written, freed
    counts = []
    for _ in range(15):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(16 << 20).fill_(1.0)
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return statistics.median(counts[5:])  # once the heap has settled

default = faults()
print(keep_freed_memory(), default, faults())
"""


@pytest.mark.slow  # a fresh process of its own
def test_keep_freed_memory_reuses_freed_activations_instead_of_faulting_them_in_again():
    import subprocess
    import sys

    applied, default, reused = subprocess.run([sys.executable, "-c", _FAULTS_PER_STEP], check=True,
                                              capture_output=True, text=True).stdout.split()
    if applied != "True":
        pytest.skip("not glibc: keep_freed_memory leaves the allocator alone")
    default, reused = float(default), float(reused)
    pages = (64 << 20) // 4096
    assert default > pages / 2, f"precondition: glibc's default heap faults a freed 64 MB block in again ({default})"
    assert reused < pages / 100, f"{reused} page faults per reallocated 64 MB block (default heap: {default})"


def test_a_constant_schedule_holds_the_rate_after_its_warmup_and_cosine_decays_it():
    from vqa.training import warmup_schedule

    def rates(after: str) -> list[float]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        sched = warmup_schedule(opt, warmup_steps=2, total_steps=10, after=after)
        out = []
        for _ in range(10):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    constant, cosine = rates("constant"), rates("cosine")
    assert constant[:2] == cosine[:2] == pytest.approx([0.05, 0.1])  # the same linear warmup
    assert constant[2:] == pytest.approx([0.1] * 8)
    assert cosine[2] == pytest.approx(0.1) and all(a > b for a, b in zip(cosine[2:], cosine[3:]))
    with pytest.raises(ValueError, match="'step'"):
        warmup_schedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), 1, 10, after="step")


def test_mevf_step_is_the_schedule_mevfs_released_code_runs(phantom_dir, tmp_path):
    from vqa.training import warmup_schedule

    base, per_epoch = 0.005, 3
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = warmup_schedule(opt, 0, 20 * per_epoch, "mevf-step", per_epoch)
    ours = []
    for _ in range(20 * per_epoch):
        ours.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    theirs, rate = [], base  # MEVF's train.py: the rate set at the start of each epoch, then held through it
    for epoch in range(20):
        if epoch < 4:
            rate = (0.5, 1.0, 1.5, 2.0)[epoch] * base
        elif epoch in range(10, 20, 2):
            rate *= 0.75
        theirs += [rate] * per_epoch
    assert ours == pytest.approx(theirs)
    assert max(ours) == pytest.approx(0.01) and ours[-1] == pytest.approx(0.01 * 0.75 ** 5)
    with pytest.raises(DataError, match=r"got a warmup of 6 steps"):
        warmup_schedule(opt, 6, 20 * per_epoch, "mevf-step", per_epoch)
    # in a run: each epoch's row has the rate where the schedule stands at its end, the next epoch's
    history = json.loads((train(_cfg(phantom_dir, tmp_path, lr=base, warmup_epochs=0, lr_schedule="mevf-step"))
                          / "metrics.json").read_text())["history"]
    assert [row["lr"] for row in history] == pytest.approx([base, 1.5 * base])
    # its own warmup and --warmup-epochs would compound: refused before any work
    with pytest.raises(DataError, match=r"pass --warmup-epochs 0 \(got a warmup of 1 epochs\)"):
        train(_cfg(phantom_dir, tmp_path, out=str(tmp_path / "warm"), lr_schedule="mevf-step"))
    assert not (tmp_path / "warm").exists()
    from pretrain import PretrainConfig
    with pytest.raises(DataError, match=r"pass --warmup-epochs 0 \(got a warmup of 0.5 epochs\)"):
        PretrainConfig(lr_schedule="mevf-step", warmup_epochs=0.5).validate()


def test_a_run_keeps_its_constant_rate_and_refuses_an_unknown_schedule(phantom_dir, tmp_path):
    history = json.loads((train(_cfg(phantom_dir, tmp_path, lr=2e-3, warmup_epochs=0, lr_schedule="constant"))
                          / "metrics.json").read_text())["history"]
    assert [row["lr"] for row in history] == pytest.approx([2e-3, 2e-3])
    with pytest.raises(DataError, match="--lr-schedule 'linear'"):
        train(_cfg(phantom_dir, tmp_path, out=str(tmp_path / "other"), lr_schedule="linear"))


def test_a_run_records_the_kernels_its_numbers_depend_on(monkeypatch):
    from vqa.training import Runtime, World
    from vqa.training.precision import numerics

    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    record = Runtime(torch.device("cpu"), World(), "bf16").numerics
    assert record == numerics(torch.device("cpu"), "bf16")
    assert record["precision"] == "bf16" and record["torch"] == torch.__version__ and record["device"] == "cpu"
    assert record["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and record["device_name"]
    assert record["onednn_max_cpu_isa"] == "AVX512_CORE_BF16"  # the cap is recorded: it changes which kernels run
    assert {record["amx"], record["avx512_bf16"]} <= {True, False, None}
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert numerics(torch.device("cpu"), "fp32")["onednn_max_cpu_isa"] is None
    # the intra-op threads too: a CPU's reductions split over them (1 and 2 threads gave two runs of one seed)
    assert record["threads"] == torch.get_num_threads() == 1  # the suite's one_thread
    torch.set_num_threads(2)
    try:
        assert numerics(torch.device("cpu"), "fp32")["threads"] == 2
    finally:
        torch.set_num_threads(1)


def test_a_resumed_rank_continues_the_saved_gpu_generator_on_its_own_device(monkeypatch):
    """Only rank 0 saves, and only its own GPU's generator has moved; rank r (on cuda:r) must continue from that
    one, not from the untouched seed state the list holds for cuda:r (it would replay the first masks again)."""
    from vqa.training import checkpoint

    moved, untouched = torch.tensor([7], dtype=torch.uint8), torch.tensor([0], dtype=torch.uint8)
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(cuda, "get_rng_state_all", lambda: [moved, untouched])
    monkeypatch.setattr(cuda, "current_device", lambda: 0)  # rank 0 saves
    assert "cuda_device" not in checkpoint.rng_state()  # one process: its list is whole (no rank, no set_device)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    state = checkpoint.rng_state()
    assert state["cuda_device"] == 0
    restored = {}
    monkeypatch.setattr(cuda, "device_count", lambda: 2)
    monkeypatch.setattr(cuda, "current_device", lambda: 1)  # rank 1 resumes on cuda:1
    monkeypatch.setattr(cuda, "set_rng_state_all", lambda states: restored.update(enumerate(states)))
    monkeypatch.setattr(cuda, "set_rng_state", lambda value, device: restored.__setitem__(device, value))
    checkpoint.set_rng_state(state)
    assert torch.equal(restored[1], moved) and torch.equal(restored[0], moved)


def test_ranks_wait_for_rank_zero_longer_than_nccls_ten_minutes(monkeypatch):
    """Ranks wait in a collective while rank 0 fills the feature cache or calibrates alone."""
    from vqa.training import distributed

    joined = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kw: joined.update(kw))
    world = distributed.init_distributed(torch.device("cpu"))
    assert world.size == 2 and joined["backend"] == "gloo" and joined["timeout"].total_seconds() >= 3600


def test_training_from_a_program_leaves_its_thread_count_as_it_was(phantom_dir, tmp_path):
    """--threads sets torch's intra-op threads for the run; a program calling train() gets its own count back."""
    assert torch.get_num_threads() == 1  # the suite's
    train(_cfg(phantom_dir, tmp_path, epochs=1, threads=2))
    assert torch.get_num_threads() == 1


def test_ranks_that_do_not_all_find_the_checkpoint_all_refuse_to_resume(phantom_dir, tmp_path, monkeypatch):
    """Under DDP a rank starting fresh beside ranks that resume would train another model under the same gradients
    (its --out on another node's disk, say): every rank raises instead."""
    import dataclasses

    from vqa.training import engine

    cfg = _cfg(phantom_dir, tmp_path, head="mevf-san", stop_after=1)
    train(cfg)
    resumed = dataclasses.replace(cfg, stop_after=None, resume="latest")
    monkeypatch.setattr(engine, "all_gather_objects", lambda mine, world: [mine, (False, None)])  # rank 1 sees none
    with pytest.raises(DataError, match=r"rank\(s\) \[0\] find a checkpoint in .*, rank\(s\) \[1\] none"):
        train(resumed)
    refused = (False, "--resume /scratch/run: no checkpoint at /scratch/run/checkpoint.pt")
    monkeypatch.setattr(engine, "all_gather_objects", lambda mine, world: [mine, refused])
    with pytest.raises(DataError, match="rank 1: --resume /scratch/run: no checkpoint"):
        train(resumed)
    monkeypatch.undo()
    assert len(json.loads((train(resumed) / "metrics.json").read_text())["history"]) == 2


def test_a_checkpoint_reaches_the_disk_before_it_replaces_the_last_one(tmp_path, monkeypatch):
    import os

    from vqa.training.checkpoint import load_checkpoint, save_checkpoint

    calls, fsync, replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append("fsync") or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: calls.append("replace") or replace(a, b))
    save_checkpoint({"epoch": 3}, tmp_path / "checkpoint.pt")
    assert calls == ["fsync", "replace"] and load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 3
