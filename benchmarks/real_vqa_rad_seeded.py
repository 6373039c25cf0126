"""Rows made over seeds: a row's finished seeds, the paired gain between two rows, their mean ± std cells, and
a row's marks."""
from __future__ import annotations

from _common import percent_mean_std
from real_vqa_rad_runs import CARVE, SEEDS, Run


def seeded(results: dict[str, dict], runs: list[Run], kind: str) -> dict[str, list[dict]]:
    """The transfer rows of one kind, by step, with the summaries of their finished seeds (in seed order)."""
    steps: dict[str, list[dict]] = {}
    for run in runs:
        if run.row == "t" and run.kind == kind:
            steps.setdefault(run.step, [])
            if run.name in results:
                steps[run.step].append({**results[run.name], "seed": run.seed})
    return steps


def paired_gain(done: list[dict], base: list[dict]) -> str:
    """Mean (± std) over the seeds both ran of the difference in full-test overall accuracy, seed by seed."""
    by_seed = {r["seed"]: r["all"]["overall"] for r in base}
    diffs = [r["all"]["overall"] - by_seed[r["seed"]] for r in done if r["seed"] in by_seed]
    return percent_mean_std(diffs, signed=True) if diffs else ""


def row_cells(done: list[dict], planned: int = len(SEEDS)) -> str:
    return (f"{len(done)} of {planned} | {percent_mean_std([r['freeform']['overall'] for r in done])} | "
            f"{percent_mean_std([r['all']['open'] for r in done])} | {percent_mean_std([r['all']['closed'] for r in done])} | "
            f"{percent_mean_std([r['all']['overall'] for r in done])}")


def marks(r: dict) -> str:
    """‡ for a row with a caveat, § for one made with the current validation carve."""
    return (" ‡" if r.get("caveat") else "") + (" §" if r.get("carve") == CARVE else "")
