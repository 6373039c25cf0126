"""benchmarks/phantom_calibration.py's tables: every stage's ECE beside its own floor, and its Brier score."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import phantom_calibration  # noqa: E402


def _stage(ece: float, floor: float, brier: float) -> dict:
    return {"ece": ece, "ece_if_calibrated": {"mean": floor}, "brier": brier, "aurc": 0.1,
            "coverage_at_risk": {"0.05": 0.5, "0.1": 0.6, "0.2": 0.9}}


def _seed(shift: float, trust: bool = True) -> dict:
    # as `medvqa eval` reports it: "after" is the bundle's calibration, temperature scaling alone without trust
    # scores; with them, temperature scaling alone is "temperature_only" beside it
    temperature = _stage(0.06 + shift, 0.05 + shift, 0.14 + shift)
    stages = {"before": _stage(0.03 + shift, 0.02 + shift, 0.16 + shift), "after": temperature}
    if trust:
        stages.update(temperature_only=temperature, after=_stage(0.07 + shift, 0.055 + shift, 0.12 + shift))
    abstention = {"coverage": 0.4, "risk": 0.05}
    return {"overall": 0.8 + shift, "groups": {"CLOSED": stages, "OPEN": stages},
            "abstention": {"CLOSED": abstention, "OPEN": abstention}}


def _measured(trust: bool = True) -> dict:
    return {"epochs": 3, "images": 60, "seeds": [0, 1],
            "runs": {"mevf-ban": [_seed(0.0, trust), _seed(0.01, trust)]}}


def test_each_stage_shows_its_own_ece_floor_and_brier_score():
    table = phantom_calibration.render(_measured())
    row = next(line for line in table.splitlines() if line.startswith("| mevf-ban | 2 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    closed_ece, closed_brier = cells[3], cells[5]
    assert closed_ece == ("0.035 ± 0.007 (0.025 ± 0.007) → 0.065 ± 0.007 (0.055 ± 0.007) → "
                          "0.075 ± 0.007 (0.060 ± 0.007)")
    assert closed_brier == "0.165 ± 0.007 → 0.145 ± 0.007 → 0.125 ± 0.007"
    assert "--epochs 3 --images 60 --seeds 0 1" in table


def test_a_head_without_trust_scores_shows_the_stages_it_has():
    row = next(line for line in phantom_calibration.render(_measured(trust=False)).splitlines()
               if line.startswith("| mevf-ban | 2 |"))
    assert row.split("|")[6].strip() == "0.165 ± 0.007 → 0.145 ± 0.007"


def test_render_rewrites_the_tables_from_the_scores_beside_them(tmp_path, monkeypatch):
    out = tmp_path / "phantom_calibration.md"
    out.with_suffix(".json").write_text(json.dumps(_measured()))
    monkeypatch.setattr(sys, "argv", ["phantom_calibration.py", "--render", "--out", str(out)])
    phantom_calibration.main()
    assert out.read_text() == phantom_calibration.render(_measured())
