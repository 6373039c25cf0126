"""docs/real_vqa_rad_per_type.png: accuracy per question type of the benchmark's frozen, train-only rows."""
from __future__ import annotations

import logging
from pathlib import Path

from real_vqa_rad_runs import Run

log = logging.getLogger("real_vqa_rad")


def plot_per_type(results: dict[str, dict], runs: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [r for r in runs if r.vocab == "train" and r.mode == "frozen" and r.selection == "val" and r.kind == "step"
              and r.name in results]
    if not chosen:
        return
    if not all(results[r.name].get("per_question_type") for r in chosen):
        log.warning("%s kept: some rows come from a results.json without per-type accuracy", path)
        return
    types = sorted({t for r in chosen for t, v in results[r.name]["per_question_type"].items() if v["n"] >= 5})
    fig, ax = plt.subplots(figsize=(12, 4))
    width = 0.8 / max(len(chosen), 1)
    for i, run in enumerate(chosen):
        per = results[run.name]["per_question_type"]
        ax.bar([j + i * width for j in range(len(types))], [100 * (per.get(t, {}).get("accuracy") or 0)
                                                             for t in types], width,
               label=f"({run.row}) {run.head}" + (" pooled" if run.features == "pooled" else ""))
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(types))], types, rotation=30)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("VQA-RAD test (451), per question type, frozen image side, train-only vocabulary")
    ax.legend(ncol=3, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
