"""The confidence tables of docs/results.md: calibration, abstention and out-of-scope of each head's best bundle,
what trust scores add, and validation's optimism against test."""
from __future__ import annotations

from _common import mean_std, percent_mean_std
from real_vqa_rad_runs import LITE0, Run
from real_vqa_rad_seeded import marks, seeded


def _pair(entry: dict, key: str, fmt: str = "{:.3f}") -> str:
    before, after = entry.get("before", {}).get(key), entry.get("after", {}).get(key)
    return " → ".join(fmt.format(v) for v in (before, after) if v is not None)


def confidence_lines(results: dict[str, dict], runs: list[Run]) -> list[str]:
    """Calibration, abstention and out-of-scope detection of the best calibrated bundle of each head."""
    best: dict[str, tuple[Run, dict, tuple]] = {}
    for run in runs:
        r = results.get(run.name)
        # a test-selected run's "validation" is the test split: its calibration was fitted on test; a row's other
        # seeds are its mean's (choosing among seeds is choosing on test)
        if not r or run.selection == "test" or run.seed or "after" not in r.get("confidence", {}).get("CLOSED", {}):
            continue
        head = {"ensemble": f"ensemble of {run.head}", "bagging": f"bagging of {run.head}"}.get(run.kind, run.head)
        # made with trust scores first (not an ensemble's members: choosing among seeds is on test), then with
        # familiarity (the current calibration), then accuracy
        made = run.kind in ("step", "variant") and "temperature_only" in r["confidence"]["CLOSED"]
        rank = (made, made and bool(r.get("familiarity")), r["all"]["overall"])
        if head not in best or rank > best[head][2]:
            best[head] = (run, r, rank)
    if not best:
        return []
    lines = ["", "## Confidence, abstention, out-of-scope images", "",
             "For the best bundle of each head (by full-test overall accuracy, among validation-selected runs made with "
             "calibration, each row's seed-0 run, the recipe's steps and variants made with trust scores first, of "
             "those the ones calibrated "
             "with [familiarity] first): "
             "temperature scaling per branch fitted on the run's validation split, never on test (combined with "
             "trust scores for the runs made with them, as the next table measures, and [familiarity]); ECE over 15 "
             "bins and AURC on the 451 test questions, closed and open apart (the dataset's own type); coverage = "
             "the share of test questions that can be answered at that risk (the test's own risk-coverage "
             "curve); abstention = what the bundle withholds at its validation-chosen threshold for 10% risk "
             "(Clopper-Pearson 90% bound); out-of-scope = the bundle's detector (Mahalanobis distance in a pooled "
             "feature space, threshold at 99% of training images out of fold: the space is the model's own image "
             "encoder (own), or ImageNet EfficientNet-Lite0's, frozen (`--ood-encoder efficientnet-lite0-imagenet`, "
             "Lite0), which the benchmark's runs use since MEVF's fine-tuned encoder proved unable to tell "
             "photographs; a frozen Lite0 model's own space is that one) on VQA-RAD's test images "
             "against scikit-image's 12 photographs, and how many of pydicom's CT and MR test files it flags (radiology, "
             "but tight crops at 128 and 64 px, a vertebra and an MR patch, unlike VQA-RAD's whole views). Brier "
             "score: the mean squared gap between confidence and right (1) or wrong (0), a proper score, read beside "
             "ECE, whose sampling noise depends on the confidences (Reading, \"How low ECE can go on this test\").", "",
             "| head | run | closed ECE before → after | open ECE before → after | Brier closed / open: before → "
             "after | AURC closed / open | closed "
             "coverage at 5% / 10% risk | open at 20% | abstention at 10%: closed answered (wrong) / open | "
             "out-of-scope AUROC | photos / test images / DICOM flagged |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for head, (run, r, _) in best.items():
        closed, opened = r["confidence"]["CLOSED"], r["confidence"]["OPEN"]
        cov_c, cov_o = closed["after"]["coverage_at_risk"], opened["after"]["coverage_at_risk"]
        ab = r.get("abstention") or {}
        ab_c, ab_o = ab.get("CLOSED", {}), ab.get("OPEN", {})

        def answered(a):
            return "–" if not a else f"{100 * a['coverage']:.0f}%" + (
                f" ({100 * a['risk']:.1f}%)" if a.get("risk") is not None else "")
        ood = r.get("out_of_scope") or {}
        familiar = " [familiarity]" * bool(r.get("familiarity"))
        lines.append(f"| {head} | {run.name}{marks(r)}{familiar} | {_pair(closed, 'ece')} | {_pair(opened, 'ece')} | "
                     f"{_pair(closed, 'brier')} / {_pair(opened, 'brier')} | {closed['after']['aurc']:.3f} / {opened['after']['aurc']:.3f} | "
                     f"{100 * cov_c['0.05']:.0f}% / {100 * cov_c['0.1']:.0f}% | {100 * cov_o['0.2']:.0f}% | "
                     f"{answered(ab_c)} / {answered(ab_o)} | "
                     + (f"{ood['auroc_photographs']:.3f} ({_space(ood)}) | {100 * ood['photographs_flagged']:.0f}% / "
                        f"{100 * ood['test_images_flagged']:.0f}% / {ood['dicom_flagged']} |" if ood else "– | – |"))
    return lines


def trust_lines(results: dict[str, dict], runs: list[Run]) -> list[str]:
    """What trust scores add to temperature scaling, seed by seed, for the rows measured with them."""
    rows = [(what, done) for kind in ("step", "variant", "ensemble", "bagging")
            for what, done in seeded(results, runs, kind).items()
            if done and all("temperature_only" in r["confidence"].get("CLOSED", {}) for r in done)]
    if not rows:
        return []
    lines = ["", "### Trust scores: what they add", "",
             "The same runs' confidence two ways, both fitted on validation only: temperature scaling alone, and "
             "combined with a trust score (how much nearer the nearest training question with the answer given lies "
             "than the nearest with another answer, in the head's fused space; `vqa.trust`) by a logistic fit per "
             "branch. Coverage on the 451 test questions' own risk-coverage curve, closed and open by the dataset's "
             "type; repeats / new as in the table of repeated test questions; a calibrated model's ECE = what one whose "
             "confidence is exactly its chance of being right shows on the same confidences (simulated test sets: "
             "sampling noise alone), with the share of them at or above the measured one. Mean ± std over the seeds (or ensembles) measured, each with trust "
             "scores. [familiarity]: the fit also reads the question's familiarity, its largest content-word overlap "
             "with a training question about the same image, and agreement, that overlap among the ones training "
             "answered as the model does less among the others (`vqa.trust`; bundles calibrated again with `medvqa "
             "calibrate`: the others were made before it).", "",
             "| row | measured | closed coverage at 5% risk: temperature → trust | at 10% | open at 20% | closed ECE | "
             "closed ECE of a calibrated model (share ≥ measured) | Brier closed / open | closed at 5% with trust: "
             "repeats / new |", "|---|---|---|---|---|---|---|---|---|"]

    def two(done, group, key, risk=None):
        values = [[r["confidence"][group][k][key] if risk is None else r["confidence"][group][k][key][risk]
                   for r in done] for k in ("temperature_only", "after")]
        return " → ".join((mean_std if key in ("ece", "brier") else percent_mean_std)(v) for v in values)
    def floor(done):  # runs scored before the floor was measured lack it
        f = [r["confidence"]["CLOSED"]["after"].get("ece_if_calibrated") for r in done]
        return "–" if None in f else (f"{mean_std([x['mean'] for x in f])} "
                                      f"({percent_mean_std([x['share_at_or_above'] for x in f])}%)")
    for what, done in rows:
        subsets = " / ".join(percent_mean_std([r["confidence"].get(f"CLOSED {s}", {}).get("after", {}).get(
            "coverage_at_risk", {}).get("0.05", float("nan")) for r in done]) for s in ("repeats_train", "new_question"))
        what += " [familiarity]" * all(r.get("familiarity") for r in done)
        lines.append(f"| {what} | {len(done)} | {two(done, 'CLOSED', 'coverage_at_risk', '0.05')} | "
                     f"{two(done, 'CLOSED', 'coverage_at_risk', '0.1')} | {two(done, 'OPEN', 'coverage_at_risk', '0.2')} "
                     f"| {two(done, 'CLOSED', 'ece')} | {floor(done)} | {two(done, 'CLOSED', 'brier')} / "
                     f"{two(done, 'OPEN', 'brier')} | {subsets} |")
    return lines


def validation_lines(results: dict[str, dict], runs: list[Run]) -> list[str]:
    """Each row's validation accuracy at its chosen epoch (what its calibration was fitted on) against test."""
    rows = [(what, done) for kind in ("step", "variant") for what, done in seeded(results, runs, kind).items()
            if done and all(r.get("validation") for r in done)]
    if not rows:
        return []
    lines = ["", "### Validation against test", "", "What the calibration was fitted on: each run's validation split "
             "(carved from train) at the epoch it chose, against the test split; mean ± std over the seeds measured "
             "(the runs that recorded it). A calibration fitted where the model is right more often than on test is "
             "overconfident there (Reading, \"Where validation's optimism comes from\").", "",
             "| row | measured | validation open / closed / overall | test open / closed / overall | closed: test − "
             "validation |", "|---|---|---|---|---|"]
    for what, done in rows:
        cells = [" / ".join(percent_mean_std([r[s][k] for r in done]) for k in ("open", "closed", "overall"))
                 for s in ("validation", "all")] + [percent_mean_std([r["all"]["closed"] - r["validation"]["closed"]
                                                                      for r in done], signed=True)]
        lines.append(f"| {what} | {len(done)} | {' | '.join(cells)} |")
    return lines


def _space(out_of_scope: dict) -> str:
    """The detector's feature space, in a word: the model's own encoder (also for runs from before spaces), or
    Lite0's."""
    space = out_of_scope.get("space", "same")
    return "own" if space == "same" else "Lite0" if space == LITE0 else space
