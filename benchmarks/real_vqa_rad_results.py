"""docs/results.json: the rows an interrupted or partial benchmark keeps, and merging runs made in parallel."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from real_vqa_rad_runs import HeadRecipe
from vqa.io import atomic_write_text

log = logging.getLogger("real_vqa_rad")


def _recipe_differences(recorded: dict, recipe: HeadRecipe) -> list[str]:
    """The recipe fields (but the machine's threads and device) on which a results.json differs from `recipe`."""
    ours = {k: v for k, v in recipe.__dict__.items() if k not in ("threads", "device")}
    keys = (ours.keys() | recorded.keys()) - {"threads", "device"}
    return sorted(k for k in keys if recorded.get(k) != ours.get(k))


def _replaces(row, have, base_row) -> bool:
    """Whether a merged file's `row` replaces the one merged so far (`have`, None: none): the later scored, where
    either records when it was scored; else one that differs from docs/results.json's (`base_row`), as each file
    also holds the rows it started with, a copy of docs/results.json that may be older than it is now."""
    if have is None:
        return True
    if isinstance(row, dict) and isinstance(have, dict) and (row.get("scored") or have.get("scored")):
        return row.get("scored", "") > have.get("scored", "")
    return row != base_row


def merge_results(docs: Path, others: list[Path], recipe: HeadRecipe) -> None:
    """Add the rows of other results.json files (runs made in parallel processes, or on other machines, each with
    its own --docs) to docs/results.json: a row is taken where it was scored later than the one there (or, rows
    from before scoring times were recorded, where it differs from it)."""
    path = docs / "results.json"
    merged = {"recipe": recipe.__dict__, "vqa_rad": {}, "medpix_retrieval": {}}
    base = json.loads(path.read_text()) if path.is_file() else {}
    for source in ([path] if path.is_file() else []) + list(others):
        if not source.is_file():
            raise SystemExit(f"--merge {source}: no such file (expected a results.json the benchmark wrote)")
        data = json.loads(source.read_text())
        differ = _recipe_differences(data.get("recipe", {}), recipe)
        if differ:
            raise SystemExit(f"--merge {source}: made with another recipe (differs in {', '.join(differ)}); "
                             "its rows would not compare with these")
        for table in ("vqa_rad", "medpix_retrieval"):
            ours, theirs = merged[table], base.get(table, {})
            ours.update({k: v for k, v in data.get(table, {}).items() if _replaces(v, ours.get(k), theirs.get(k))})
        log.info("%s: %d rows", source, len(data.get("vqa_rad", {})))
    atomic_write_text(path, json.dumps(merged, indent=1) + "\n")


def earlier_results(docs: Path, recipe: HeadRecipe) -> dict:
    """Run summaries from an earlier docs/results.json made with the same recipe (for --only)."""
    path = docs / "results.json"
    if not path.is_file():
        return {}
    earlier = json.loads(path.read_text())
    if _recipe_differences(earlier.get("recipe", {}), recipe):
        log.warning("%s was made with another recipe: its rows are not reused", path)
        return {}
    return earlier.get("vqa_rad", {})
