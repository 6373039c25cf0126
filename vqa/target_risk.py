"""The abstention target: the share of wrong answers a bundle allows among those it gives, for every branch
alike or per branch.

One risk for closed and open questions alike is a poor fit for most VQA models: a yes/no answer is right
far more often than an open one, so a target tight enough for closed answers (5 %) withholds nearly every
open answer, and one loose enough for open answers (20 %) lets doubtful yes/no answers through. Written as
`0.1` (every branch), `closed=0.05,open=0.2` (per branch; any other branch, e.g. multiple choice, the
default 0.1) or `0.1,closed=0.05` (a default and overrides). Branch names are the model's own question
types (`vqa.inference.Predictions.branches`), case-insensitive.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from .data.record import CLOSED, OPEN
from .errors import DataError
from .inference import CHOICE_BRANCH

DEFAULT_TARGET_RISK = 0.1
BRANCHES = (CLOSED, OPEN, CHOICE_BRANCH)


def check_risk(target_risk: float, branch: str | None = None) -> float:
    if not 0.0 < float(target_risk) < 1.0:
        given = f"{branch.lower()}={target_risk}" if branch else target_risk
        raise DataError(f"--target-risk {given}: expected a share of wrong answers strictly between 0 and 1")
    return float(target_risk)


def _branch(name: str, spec: str) -> str:
    branch = name.strip().upper()
    if branch not in BRANCHES:
        raise DataError(f"--target-risk {spec!r}: unknown branch {name.strip()!r}; expected one of "
                        f"{', '.join(b.lower() for b in BRANCHES)}")
    return branch


@dataclass(frozen=True)
class TargetRisk:
    """`default` for every branch not in `per_branch` (branch, risk) pairs."""

    default: float = DEFAULT_TARGET_RISK
    per_branch: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        check_risk(self.default)
        for branch, risk in self.per_branch:
            check_risk(risk, branch)

    @classmethod
    def given_or(cls, given: "TargetRisk | float | str | None", stored: "TargetRisk | None") -> "TargetRisk":
        """A command's target when it gives one, else the bundle's (`stored`), else the default."""
        return cls.parse(given) if given is not None else stored or cls()

    def of(self, branch: str) -> float:
        """The risk allowed to `branch`'s answers."""
        return dict(self.per_branch).get(branch, self.default)

    @classmethod
    def parse(cls, value: "TargetRisk | float | str") -> "TargetRisk":
        """From a number, text (`0.1`, `closed=0.05,open=0.2`, `0.1,closed=0.05`) or a stored form (`from_json`)."""
        if isinstance(value, TargetRisk):
            return value
        if isinstance(value, dict):
            return cls.from_json(value, "target_risk")
        if isinstance(value, (int, float)):
            return cls(check_risk(value))
        spec, default, pairs = str(value), DEFAULT_TARGET_RISK, {}
        for part in (p.strip() for p in spec.split(",")):
            name, sep, number = part.rpartition("=")
            try:
                risk = float(number)
            except ValueError:
                raise DataError(f"--target-risk {spec!r}: {number!r} is not a number (expected e.g. 0.1 or "
                                "closed=0.05,open=0.2)") from None
            if sep:
                branch = _branch(name, spec)
                pairs[branch] = check_risk(risk, branch)
            else:
                default = check_risk(risk)
        return cls(default, tuple(sorted(pairs.items())))

    def __str__(self) -> str:
        """The text `parse` reads back."""
        text = ",".join(f"{b.lower()}={r:g}" for b, r in self.per_branch)
        if not self.per_branch or self.default != DEFAULT_TARGET_RISK:
            text = f"{self.default:g}" + (f",{text}" if text else "")
        return text

    def describe(self, branches: Iterable[str] | None = None) -> str:
        """For people, to read as "wrong at most ... of the time": `10%`, or per branch `5% (closed) / 20% (open)`
        (`branches`: a model's; default: those named, and the rest)."""
        names = sorted(set(branches)) if branches is not None else [b for b, _ in self.per_branch]
        risks = {self.of(b) for b in names} | ({self.default} if branches is None else set())
        if len(risks) <= 1:
            return f"{next(iter(risks), self.default):.0%}"
        text = " / ".join(f"{self.of(b):.0%} ({b.lower()})" for b in names)
        return text if branches is not None else f"{text} / {self.default:.0%} (otherwise)"

    def to_json(self) -> float | dict[str, float]:
        return self.default if not self.per_branch else {"default": self.default, **dict(self.per_branch)}

    @classmethod
    def from_json(cls, value: Any, where: str) -> "TargetRisk":
        """A stored target: a number (every branch; bundles before per-branch targets), {"default", BRANCH...}, or
        the dataclass's own fields as a run_config.json records them ({"default", "per_branch": [[BRANCH, RISK]]})."""
        try:
            if isinstance(value, dict) and "per_branch" in value:
                value = {"default": value.get("default", DEFAULT_TARGET_RISK), **dict(value["per_branch"])}
            if isinstance(value, dict):
                pairs = {_branch(k, str(value)): float(v) for k, v in value.items() if k != "default"}
                return cls(float(value.get("default", DEFAULT_TARGET_RISK)), tuple(sorted(pairs.items())))
            return cls(float(value))
        except (TypeError, ValueError, DataError) as e:
            raise DataError(f"{where}: target_risk {value!r} is not a risk target ({e})") from None


# -- an evaluation report's abstention entry (vqa.evaluate.trust_report) --------------------------------------------
def abstention_groups(abstention: dict[str, Any]) -> dict[str, dict]:
    """Its coverage and realised risk per question group (the dataset's types, or "all" for multiple choice)."""
    return {k: v for k, v in abstention.items() if k not in ("target_risk", "out_of_scope_share")}


def reported_target(abstention: dict[str, Any], where: str = "metrics.json") -> str:
    """The target it was scored at, for people (a multiple-choice report's one group is the choice branch)."""
    groups = [g for g in abstention_groups(abstention) if g in BRANCHES] or [CHOICE_BRANCH]
    return TargetRisk.from_json(abstention["target_risk"], where).describe(groups)
