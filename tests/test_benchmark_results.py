"""The real-data benchmark's results.json merging: runs made in parallel, each from a copy of the docs' rows."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import real_vqa_rad_results  # noqa: E402  (the project's own: an import error fails these tests, never skips them)
from real_vqa_rad_runs import HeadRecipe  # noqa: E402


def _write(path: Path, rows: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"recipe": HeadRecipe().__dict__, "vqa_rad": rows, "medpix_retrieval": {}}))
    return path


def test_a_stale_copy_never_overwrites_a_row_scored_later(tmp_path):
    old = {"a": {"all": 1}, "b": {"all": 2}}
    docs = _write(tmp_path / "docs" / "results.json", old)
    # two runs started from copies of the docs: the first rescored "a", the second "b"; then the first is merged,
    # and a third copy, taken after it (so holding the new "a"), rescores "b" again later
    first = _write(tmp_path / "x" / "results.json", {**old, "a": {"all": 10, "scored": "2026-12-05T16:00:00Z"}})
    second = _write(tmp_path / "y" / "results.json", {**old, "b": {"all": 20, "scored": "2026-12-05T16:05:00Z"}})
    real_vqa_rad_results.merge_results(docs.parent, [first], HeadRecipe())
    third = _write(tmp_path / "z" / "results.json", {**json.loads(docs.read_text())["vqa_rad"],
                                                    "b": {"all": 30, "scored": "2026-12-05T17:00:00Z"}})
    real_vqa_rad_results.merge_results(docs.parent, [third, second], HeadRecipe())
    rows = json.loads(docs.read_text())["vqa_rad"]
    assert rows["a"]["all"] == 10 and rows["b"]["all"] == 30  # second's "b" is older than third's
    # and a copy from before the first merge, whose "a" is stale and unscored, leaves the scored "a" alone
    stale = _write(tmp_path / "w" / "results.json", old)
    real_vqa_rad_results.merge_results(docs.parent, [stale], HeadRecipe())
    assert json.loads(docs.read_text())["vqa_rad"] == rows


def test_rows_from_before_scoring_times_merge_where_they_differ(tmp_path):
    docs = _write(tmp_path / "docs" / "results.json", {"a": {"all": 1}, "b": {"all": 2}})
    other = _write(tmp_path / "x" / "results.json", {"a": {"all": 1}, "b": {"all": 5}, "c": {"all": 7}})
    real_vqa_rad_results.merge_results(docs.parent, [other], HeadRecipe())
    assert json.loads(docs.read_text())["vqa_rad"] == {"a": {"all": 1}, "b": {"all": 5}, "c": {"all": 7}}
    made_otherwise = tmp_path / "y" / "results.json"
    _write(made_otherwise, {})
    made_otherwise.write_text(json.dumps({"recipe": {**HeadRecipe().__dict__, "hidden": 1024}, "vqa_rad": {}}))
    with pytest.raises(SystemExit, match="made with another recipe.*hidden"):
        real_vqa_rad_results.merge_results(docs.parent, [made_otherwise], HeadRecipe())


def test_the_ensembles_table_gives_each_kind_of_ensemble_its_own_row(tmp_path):
    from real_vqa_rad_docs import ensemble_lines
    from real_vqa_rad_runs import transfer_steps

    runs = [run for _, group in transfer_steps(tmp_path / "a", tmp_path / "b", tmp_path / "c") for run in group]
    built = [run for run in runs if run.kind in ("ensemble", "bagging")]
    nine = next(run for run in built if len(run.members) == 9)
    assert len(set(nine.members)) == 9 and len({run.name for run in built}) == len(built)
    summary = {"all": {"open": 0.5, "closed": 0.7, "overall": 0.6}, "freeform": {"overall": 0.6}}
    results = {name: summary for name in nine.members}
    results.update({run.name: {**summary, "all": {**summary["all"], "overall": 0.7}} for run in built})
    rows = {line.split(" | ")[0].lstrip("| "): line for line in ensemble_lines(results, runs) if line.startswith("| ")}
    assert rows[nine.step].split(" | ")[1] == "1 of 1"  # its own row, not a fourth bagging ensemble
    bagged = next(run.step for run in built if run.kind == "bagging" and len(run.members) == 3)
    assert rows[bagged].split(" | ")[1] == "3 of 3" and "+10.0" in rows[bagged]


def test_the_bf16_bagging_ensembles_share_no_member_and_their_pool_has_its_own_row(tmp_path):
    from real_vqa_rad_docs import BF16_BAGGING_NOTE, ensemble_lines
    from real_vqa_rad_runs import BF16_BAGGING_STEP, transfer_steps

    runs = [run for _, group in transfer_steps(tmp_path / "a", tmp_path / "b", tmp_path / "c") for run in group]
    by_name = {run.name: run for run in runs}
    bf16 = [run for run in runs if run.step == BF16_BAGGING_STEP]
    assert len(bf16) == 3
    members = [by_name[m] for run in bf16 for m in run.members]
    assert len({m.name for m in members}) == 27  # no member shared between the ensembles
    for run in bf16:  # three runs of each carve, every one trained under bf16
        carves = [by_name[m].val_seed if by_name[m].val_seed is not None else by_name[m].seed for m in run.members]
        assert sorted(carves) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
        assert all(dict(by_name[m].extra)["precision"] == "bf16" for m in run.members)
    fp32_nine = next(run for run in runs if run.kind == "bagging" and len(run.members) == 9
                     and run.step != BF16_BAGGING_STEP)
    summary = {"all": {"open": 0.5, "closed": 0.7, "overall": 0.6}, "freeform": {"overall": 0.6}}
    results = {name: summary for name in fp32_nine.members + bf16[0].members}
    results[fp32_nine.name] = {**summary, "all": {**summary["all"], "overall": 0.7}}
    before = ensemble_lines(results, runs)
    assert not any(BF16_BAGGING_NOTE.strip() in line for line in before)
    assert not any(line.startswith("| one run (the pool of members): ") for line in before)  # nothing bagged yet
    results[bf16[0].name] = {**summary, "all": {**summary["all"], "overall": 0.75}}
    lines = ensemble_lines(results, runs)
    assert any(BF16_BAGGING_NOTE.strip() in line for line in lines)
    table = [line for line in lines if line.startswith("| ") and not line.startswith("| what")]
    pools = [line for line in table if line.startswith("| one run (the pool of members)")]
    assert [line.split(" | ")[1] for line in pools] == ["9 runs", "9 runs"]  # each pool its own, not 18
    assert "bf16" in pools[1] and table.index(pools[1]) == table.index(next(
        line for line in table if line.startswith(f"| {BF16_BAGGING_STEP}"))) - 1  # right above its ensembles
    row = next(line for line in table if line.startswith(f"| {BF16_BAGGING_STEP}")).split(" | ")
    assert row[1] == "1 of 3" and row[6] == "+15.0"


def _released_rows(path: Path) -> list[str]:
    """The rows of the released-schedules table of a results.md."""
    text = path.read_text()
    if "### The references' heads on their released schedules" not in text:
        return []
    table = text.split("### The references' heads on their released schedules", 1)[1].split("\n\n")[2]
    return table.splitlines()[2:]


def test_the_qcr_reproduction_row_says_whose_schedule_it_ran(tmp_path):
    from real_vqa_rad_docs import write_results
    from real_vqa_rad_runs import CARVE, QCR_SCHEDULE, SEEDS, all_runs

    runs = all_runs(tmp_path / "mevf", tmp_path / "medpix", tmp_path / "untrained", ("qcr",), ("train", "candidates"),
                    True, paper_schedule=True)
    honest = [run for run in runs if run.tag == "qcr-schedule" and run.vocab == "train"]
    assert [run.seed for run in honest] == list(SEEDS) and len({run.name for run in honest}) == len(SEEDS)
    schedule = dict(QCR_SCHEDULE)  # QCR's code: Adamax at its default rate, never changed; BCE at its default reduction
    assert schedule["lr"] == 0.002 and schedule["lr_schedule"] == "constant" and schedule["loss"] == "bce-mean"
    assert dict(schedule["head_args"])["separate_router"] is True
    summary = {"all": {"open": 0.5, "closed": 0.7, "overall": 0.6}, "freeform": {"overall": 0.6},
               "median_epoch_seconds": 86.0, "carve": CARVE}
    write_results({honest[0].name: summary}, runs, {}, tmp_path / "results.md", HeadRecipe())
    text = (tmp_path / "results.md").read_text()
    assert _released_rows(tmp_path / "results.md") == ["| qcr | 200 epochs ¶ | ours § | 1 of 3 | 60.0 | 50.0 | 70.0 | "
                                                       "60.0 |  |"]
    assert not any(line.startswith("| ours (a)") for line in text.splitlines())  # not in the main table too
    assert "¶ QCR's schedule as its released code runs it: Adamax at 0.002 held constant" in text
    # a second seed: the row is their mean ± std
    other = {**summary, "all": {"open": 0.6, "closed": 0.8, "overall": 0.7}}
    write_results({honest[0].name: summary, honest[2].name: other}, runs, {}, tmp_path / "two.md", HeadRecipe())
    assert _released_rows(tmp_path / "two.md")[0].startswith("| qcr | 200 epochs ¶ | ours § | 2 of 3 | 60.0 ± 0.0 | "
                                                             "55.0 ± 7.1 | 75.0 ± 7.1 | 65.0 ± 7.1 |")
    # without the rows, no table and no note
    write_results({}, runs, {}, tmp_path / "empty.md", HeadRecipe())
    assert "¶" not in (tmp_path / "empty.md").read_text() and not _released_rows(tmp_path / "empty.md")
    # the control's first epochs alone: the same schedule (its length included), its row says how far it went
    control = [run for run in runs if run.tag == "qcr-schedule" and run.selection == "test"]
    for seed in SEEDS:
        partial = [run for run in control if run.schedule_epochs and run.seed == seed]
        full = next(run for run in control if not run.schedule_epochs and run.seed == seed)
        epochs = [run.epochs for run in partial] + [full.epochs]
        assert len(partial) >= 2 and all(a < b for a, b in zip(epochs, epochs[1:]))
        for run in partial:
            assert dict(run.extra) == {**dict(full.extra), "schedule_epochs": full.epochs}
            assert run.name != full.name and run.gpu_sized
        # each stretch continues the one before (of its own seed), the full run the last; the first starts afresh
        assert [run.continues for run in partial + [full]] == ["", *(run.name for run in partial)]
    seed0 = [run for run in control if run.seed == 0]
    # a stretch the next one continued is superseded by it (its epochs are the next one's first), down to the full
    # run; the paired gain is over our protocol's run of the same seed
    made = {honest[0].name: summary}
    for run in seed0:
        made[run.name] = {**summary, "all": {"open": 0.6, "closed": 0.8, "overall": 0.65}}
        write_results(made, runs, {}, tmp_path / "longer.md", HeadRecipe())
        shown = _released_rows(tmp_path / "longer.md")[1]
        assert shown.startswith("| qcr | 200 epochs ¶ | references'* | 1 of 3") and shown.endswith(" | +5.0 |")
        assert (f"(seed 0: the first {run.epochs} of 200 epochs)" in shown) == (run is not seed0[-1])


def test_the_mevf_reproduction_rows_run_mevfs_released_schedule(tmp_path):
    from real_vqa_rad_docs import write_results
    from real_vqa_rad_runs import CARVE, MEVF_SCHEDULE, SEEDS, all_runs

    from vqa.train import TrainConfig
    from vqa.training.schedule import check_schedule

    runs = all_runs(tmp_path / "mevf", tmp_path / "medpix", tmp_path / "untrained", ("mevf-ban",),
                    ("train", "candidates"), True, paper_schedule=True)
    mevf = [run for run in runs if run.tag == "mevf-schedule"]
    assert [(r.vocab, r.selection, r.epochs, r.gpu_sized, r.seed) for r in mevf] == [
        (vocab, selection, 20, True, seed) for seed in SEEDS for vocab, selection in (("train", "val"),
                                                                                     ("candidates", "test"))]
    schedule = dict(MEVF_SCHEDULE)  # MEVF's main.py and train.py: --lr 0.005 on BAN's epoch-wise steps, batch 32
    assert schedule["lr"] == 0.005 and schedule["batch_size"] == 32 and schedule["loss"] == "bce"
    assert schedule["aux_weight"] == pytest.approx(0.001 / 32) and schedule["clip_norm"] == 0.25
    check_schedule(schedule["lr_schedule"], schedule["warmup_epochs"])  # a run would not refuse it
    # its released 600-d word embedding, a file of the imported MEVF folder; every other setting a training field
    assert schedule["word_vectors"] == "glove_tfidf_600d.txt" and schedule["embed_dim"] == 600
    TrainConfig(**{k: v for k, v in MEVF_SCHEDULE if k not in ("head_args", "word_vectors")})
    summary = {"all": {"open": 0.5, "closed": 0.7, "overall": 0.6}, "freeform": {"overall": 0.6},
               "median_epoch_seconds": 150.0, "carve": CARVE}
    control = {"all": {"open": 0.55, "closed": 0.75, "overall": 0.62}, "freeform": {"overall": 0.61}}
    write_results({mevf[0].name: summary, mevf[1].name: control, mevf[3].name: control}, runs, {},
                  tmp_path / "results.md", HeadRecipe())
    text = (tmp_path / "results.md").read_text()
    # the control's two seeds against the one seed of ours both made: the gain is paired
    assert _released_rows(tmp_path / "results.md") == [
        "| mevf-ban | 20 epochs ‖ | ours § | 1 of 3 | 60.0 | 50.0 | 70.0 | 60.0 |  |",
        "| mevf-ban | 20 epochs ‖ | references'* | 2 of 3 | 61.0 ± 0.0 | 55.0 ± 0.0 | 75.0 ± 0.0 | 62.0 ± 0.0 | +2.0 |"]
    assert "¶" not in text and "‖ MEVF's schedule as its released code runs it: Adamax from 0.005" in text


def _transfer_runs(tmp_path):
    from real_vqa_rad_runs import transfer_steps

    return [run for _, group in transfer_steps(tmp_path / "a", tmp_path / "b", tmp_path / "c") for run in group]


def _calibrated(overall: float, trust: bool) -> dict:
    closed = {"after": {"ece": 0.1, "brier": 0.2, "aurc": 0.1, "coverage_at_risk": {"0.05": 0.3, "0.1": 0.5}},
              "before": {"ece": 0.2, "brier": 0.3}}
    closed.update({"temperature_only": closed["after"]} if trust else {})
    opened = {"after": {"ece": 0.1, "brier": 0.2, "aurc": 0.2, "coverage_at_risk": {"0.2": 0.4}}, "before": {}}
    return {"all": {"open": 0.5, "closed": 0.7, "overall": overall}, "freeform": {"overall": overall},
            "confidence": {"CLOSED": closed, "OPEN": opened}}


def test_each_heads_best_bundle_is_one_made_with_trust_scores_never_an_ensembles_extra_member(tmp_path):
    from real_vqa_rad_confidence import confidence_lines

    runs = _transfer_runs(tmp_path)
    step4 = next(run for run in runs if run.kind == "step" and run.head == "fusion-transformer-qcr")
    member = next(run for run in runs if run.kind == "member")
    san = [run for run in runs if run.kind == "variant" and run.head == "mevf-san"]
    assert len(san) == 3 and all(run.base.startswith("EfficientNet-Lite0 ImageNet") for run in san)
    results = {step4.name: _calibrated(0.68, trust=True), member.name: _calibrated(0.71, trust=True),
               san[0].name: _calibrated(0.55, trust=True), san[1].name: _calibrated(0.58, trust=False)}
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1] for line in confidence_lines(results, runs)
            if line.startswith("| ") and not line.startswith("| head")}
    # the member scored higher on test, but choosing it among the step's seeds would choose on test
    assert rows["fusion-transformer-qcr"].startswith(step4.name)
    assert rows["mevf-san"].startswith(san[0].name)  # made with trust scores, though less accurate


def test_validation_against_test_is_tabled_for_the_rows_that_recorded_it(tmp_path):
    from real_vqa_rad_confidence import validation_lines

    runs = _transfer_runs(tmp_path)
    san = [run for run in runs if run.kind == "variant" and run.head == "mevf-san"]
    results = {run.name: {**_calibrated(0.55, trust=True),
                          "validation": {"open": 0.4, "closed": closed, "overall": 0.65}}
               for run, closed in zip(san, (0.80, 0.84, 0.88))}
    assert validation_lines({}, runs) == []
    rows = [line for line in validation_lines(results, runs) if line.startswith(f"| {san[0].step}")]
    assert len(rows) == 1
    cells = rows[0].split(" | ")
    assert cells[1] == "3" and cells[2].startswith("40.0 ± 0.0 / 84.0 ± 4.0") and cells[3].startswith("50.0")
    assert cells[4].startswith("-14.0 ± 4.0")  # test closed 70% against validation's 84% mean


def test_a_run_resumes_its_own_checkpoint_else_the_one_it_continues(tmp_path):
    from real_vqa_rad import resume_point
    from real_vqa_rad_runs import all_runs

    runs = all_runs(tmp_path / "mevf", tmp_path / "medpix", tmp_path / "untrained", ("qcr",), ("candidates",),
                    True, paper_schedule=True)
    first, second = [run for run in runs if run.schedule_epochs][:2]
    out = tmp_path / "real"
    assert resume_point(first, out) is None and resume_point(second, out) is None
    (out / "vqa" / first.name).mkdir(parents=True)
    (out / "vqa" / first.name / "checkpoint.pt").write_bytes(b"")
    assert resume_point(first, out) == "latest"
    assert resume_point(second, out) == str(out / "vqa" / first.name / "checkpoint.pt")
    (out / "vqa" / second.name).mkdir()
    (out / "vqa" / second.name / "checkpoint.pt").write_bytes(b"")
    assert resume_point(second, out) == "latest"  # interrupted, it continues itself


def test_a_rows_scoring_time_is_when_it_was_evaluated_not_summarized(tmp_path):
    """A machine re-reading an old evaluation (a rerun that finds the run done) must not stamp it as new: its row
    would then win a --merge over one evaluated again elsewhere since."""
    import os

    from real_vqa_rad import summarize

    folder = tmp_path / "run"
    (folder / "eval").mkdir(parents=True)
    report = {"epochs": 2, "best_epoch": 1, "subsets": {"all": {"open": 0.5, "closed": 0.7, "overall": 0.6}}}
    (folder / "eval" / "metrics.json").write_text(json.dumps(report))
    evaluated = 1_764_000_000  # 2025-11-24T16:00:00Z
    os.utime(folder / "eval" / "metrics.json", (evaluated, evaluated))
    assert summarize(report, folder)["scored"] == "2025-11-24T16:00:00Z"


def test_rows_a_narrower_run_list_does_not_define_stay_in_results_json(tmp_path):
    """--no-finetune (or any list without MEVF's end-to-end runs) renders what it defines and drops no row."""
    from real_vqa_rad import undefined
    from real_vqa_rad_docs import write_docs
    from real_vqa_rad_runs import all_runs

    narrow = all_runs(tmp_path / "mevf", tmp_path / "medpix", tmp_path / "untrained", ("qcr",), ("train",), False)
    full = all_runs(tmp_path / "mevf", tmp_path / "medpix", tmp_path / "untrained", ("qcr",), ("train",), True)
    finetuned = next(r.name for r in full if r.mode == "finetune")
    earlier = {finetuned: {"all": {"overall": 0.65}}}
    assert finetuned not in {r.name for r in narrow} and undefined(earlier, narrow) == earlier
    write_docs({}, narrow, {}, tmp_path / "docs", HeadRecipe(), kept=undefined(earlier, narrow))
    assert json.loads((tmp_path / "docs" / "results.json").read_text())["vqa_rad"] == earlier
    assert finetuned not in (tmp_path / "docs" / "results.md").read_text()  # kept, not rendered


def test_a_finished_run_made_with_another_recipe_is_not_reported_under_this_one(tmp_path):
    """A run's name holds none of --hidden, --loss, --lr, --epochs: a folder made with other values is refused."""
    import dataclasses

    from real_vqa_rad import check_same_recipe
    from vqa.training.runtime import jsonable
    from vqa.train import TrainConfig

    made = TrainConfig(question_dim=512, head_args={"hidden_dim": 512}, loss="ce", epochs=20, threads=2)
    (tmp_path / "run_config.json").write_text(json.dumps(jsonable(dataclasses.asdict(made))))
    check_same_recipe(tmp_path, dataclasses.replace(made, threads=1, resume="latest"))  # the same recipe elsewhere
    with pytest.raises(SystemExit, match=r"question_dim=512.*this recipe has question_dim=1024"):
        check_same_recipe(tmp_path, dataclasses.replace(made, question_dim=1024, head_args={"hidden_dim": 1024}))
    with pytest.raises(SystemExit, match="loss='ce'"):
        check_same_recipe(tmp_path, dataclasses.replace(made, loss="bce"))


def test_a_pretrained_tower_is_reused_only_for_the_recipe_it_recorded(tmp_path, monkeypatch):
    """A MedPix tower folder from another recipe (more epochs, another rate) is refused, never reported as this one."""
    import dataclasses

    import pretrain
    from real_vqa_rad import pretrained
    from pretrain import PretrainConfig
    from vqa.training.runtime import jsonable

    made = PretrainConfig(data="medpix2", val_split="dev", exclude_vqa_rad=True, encoder="efficientnet-lite0-imagenet",
                          text="minilm", augment=True, epochs=10, lr=1e-4, batch_size=64, out=str(tmp_path), threads=2)
    (tmp_path / "run_config.json").write_text(json.dumps(jsonable(dataclasses.asdict(made))))
    (tmp_path / "metrics.json").write_text(json.dumps({"after": {"retrieval": {"mean_recall": 9.0}}}))
    monkeypatch.setattr(pretrain, "pretrain", lambda cfg: pytest.fail("pretrained again"))
    assert pretrained(dataclasses.replace(made, threads=1))["after"]["retrieval"]["mean_recall"] == 9.0
    with pytest.raises(SystemExit, match="made with epochs=10; this recipe has epochs=20: pass another --out"):
        pretrained(dataclasses.replace(made, epochs=20))
