"""Calibrated confidence and abstention, fitted on validation and stored in the bundle.

Confidence is the probability that the model's answer is right. The head's logits become a
distribution over answers (`softmax(logits / T)`, answers a branch rules out excluded: the
documented equivalent of calibrating BCE sigmoids, which do not sum to 1), with one
temperature T per **branch**: the question type the model itself assigns (QCR's router,
else the answer: yes/no = closed), or "choice" for multiple choice. T is the value that
minimises the log-loss of the top answer's probability against whether it was right, on
the validation split (questions whose answer is outside the vocabulary count as wrong:
the model cannot get them right, and its confidence must say so). Nothing is fitted on test.

Where the head exposes its fused vector (every answer classifier and their ensembles; not multiple choice),
the temperature-scaled confidence is combined with a trust score (`vqa.trust`: is the answer backed
by the nearest training questions in that space?), the question's familiarity (was it asked about
this image in training, in nearly the same words?) and agreement (was it answered so there?) by a
logistic fit per branch on validation, sigmoid(a * logit(confidence) + b * trust + c + d *
familiarity + e * agreement), stored as [a, b, c, d, e] ([a, b, c] in bundles from before
familiarity): still a probability that the answer is right, now able to rank an answer its
training neighbours support above an equally confident one they contradict. A branch with too few
right or wrong validation answers keeps temperature scaling alone.

Abstention: for a target risk r (the share of wrong answers among those given; one per branch if
wanted, `vqa.target_risk`), each branch keeps the lowest confidence threshold at which the answers
above it were wrong at most r of the time on validation, with 90 % confidence: the one-sided
Clopper-Pearson upper bound of their error rate is at most r (a validation split of a few hundred
questions would otherwise pick thresholds that hold on it and not on test). The validation
confidences are stored, so a threshold for any other target is computed at load time
(`--target-risk` of `medvqa predict`).

Metrics (`calibration_metrics`): expected calibration error (15 equal-width bins) beside the ECE a
perfectly calibrated model would show on as many questions (`ece_of_calibrated`), Brier
score, the risk-coverage curve, its area (AURC) and the coverage at given risks.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from .errors import DataError
from .inference import MASKED
from .target_risk import DEFAULT_TARGET_RISK, TargetRisk
from .trust import TRUST_FILE, TrustScorer

CALIBRATION_FILE = "calibration.json"
RISK_DELTA = 0.1  # abstention thresholds hold the validation error rate's 90 % upper bound to the target
MIN_TRUST_FIT = 5  # right and wrong validation answers a branch needs before trust scores are fitted on it
ECE_DRAWS = 1000  # simulated test sets behind `ece_of_calibrated`: its mean moves about 0.001 between seeds
_GRID = np.exp(np.linspace(math.log(0.02), math.log(50.0), 241))  # temperatures tried, log-spaced


def top_confidence(logits: torch.Tensor, temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
    """(Q, A) logits -> (Q,) the top answer's probability under softmax(logits / T), ruled-out answers excluded."""
    scaled = logits.float() / torch.as_tensor(temperature, dtype=torch.float32).reshape(-1, 1)
    scaled = scaled.masked_fill(logits <= MASKED, float("-inf"))
    return scaled.softmax(-1).max(-1).values


def _log_loss(conf: np.ndarray, correct: np.ndarray) -> float:
    p = np.clip(conf, 1e-6, 1 - 1e-6)
    return float(-(correct * np.log(p) + (1 - correct) * np.log(1 - p)).mean())


def fit_temperature(logits: torch.Tensor, correct: np.ndarray) -> float:
    """The T (on a log grid, 0.02-50) whose top-answer confidence has the least log-loss against `correct`."""
    if len(correct) == 0:
        return 1.0
    losses = [_log_loss(top_confidence(logits, t).numpy(), correct) for t in _GRID]
    return float(_GRID[int(np.argmin(losses))])


def risk_upper_bound(wrong: np.ndarray, answered: np.ndarray, delta: float = RISK_DELTA) -> np.ndarray:
    """One-sided Clopper-Pearson upper bound (confidence 1 - delta) of an error rate `wrong` / `answered`."""
    from scipy.stats import beta

    wrong, answered = np.asarray(wrong, dtype=float), np.asarray(answered, dtype=float)
    bound = beta.ppf(1 - delta, wrong + 1, np.maximum(answered - wrong, 1e-12))
    return np.where(wrong >= answered, 1.0, bound)


def risk_threshold(conf: np.ndarray, correct: np.ndarray, target_risk: float, delta: float = RISK_DELTA) -> float:
    """The lowest threshold t such that the answers with confidence >= t are wrong at most `target_risk` of the
    time with confidence 1 - `delta` (their error rate's upper bound); above every confidence (answer nothing)
    when no threshold reaches the target."""
    order = np.argsort(-conf, kind="stable")
    wrong = np.cumsum(1 - correct[order])
    risk = risk_upper_bound(wrong, np.arange(1, len(order) + 1), delta) if delta else wrong / np.arange(1, len(order) + 1)
    ok = np.nonzero((risk <= target_risk) & _last_of_ties(conf[order]))[0]
    if len(ok) == 0:
        return float("inf")
    k = ok[-1]  # the most answers kept at that risk
    return float(conf[order][k])


def _last_of_ties(descending: np.ndarray) -> np.ndarray:
    """Where a threshold can cut confidences sorted high to low: after the last of each run of equal values (a
    threshold keeps all of a tie or none of it, whatever order the ties were listed in)."""
    return np.append(descending[:-1] > descending[1:], True) if len(descending) else np.zeros(0, dtype=bool)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p) - np.log1p(-p)


def _combined(conf: np.ndarray, trust: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """sigmoid(a * logit(conf) + b * trust + c [+ d * familiarity + e * agreement]); `trust`: (Q,) or
    (Q, len(weights) - 2)."""
    a, b, c, *more = weights
    scores = np.asarray(trust, dtype=float).reshape(len(conf), len(weights) - 2)
    z = a * _logit(conf) + scores @ np.array([b, *more]) + c
    return 1.0 / (1.0 + np.exp(-z))


def fit_trust_weights(conf: np.ndarray, trust: np.ndarray, correct: np.ndarray) -> list[float] | None:
    """[a, b, c, (d, e)] of sigmoid(a * logit(conf) + b * trust + c (+ d * familiarity + e * agreement)) fitted on
    validation by (L2-regularised) logistic regression (`trust`: (Q,) or (Q, 3), `TrustScorer.features_of`'s
    columns), or None where the branch has fewer than MIN_TRUST_FIT right or wrong answers."""
    right = int(np.sum(correct))
    if min(right, len(correct) - right) < MIN_TRUST_FIT:
        return None
    from sklearn.linear_model import LogisticRegression

    scores = np.asarray(trust, dtype=float).reshape(len(conf), -1)
    x = np.concatenate([_logit(conf)[:, None], scores], axis=1)
    fit = LogisticRegression(C=1.0).fit(x, np.asarray(correct, dtype=int))
    a, b, *more = (float(w) for w in fit.coef_[0])
    return [a, b, float(fit.intercept_[0]), *more]


@dataclass
class Calibration:
    """What a bundle stores in calibration.json: temperatures per branch and the validation evidence, and where
    trust scores are used, the per-branch weights combining them with the confidence (and the trust memory,
    stored beside it as trust.safetensors)."""

    temperatures: dict[str, float]
    target_risk: TargetRisk = field(default_factory=TargetRisk)
    # validation: per branch, each question's calibrated confidence and whether the answer was right
    evidence: dict[str, dict[str, list]] = field(default_factory=dict)
    fitted_on: str = "validation"
    trust_weights: dict[str, list[float]] = field(default_factory=dict)  # branch -> [a, b, c]
    trust: TrustScorer | None = None

    @property
    def uses_trust(self) -> bool:
        return bool(self.trust_weights) and self.trust is not None

    def temperature_confidence(self, logits: torch.Tensor, branches: Sequence[str]) -> torch.Tensor:
        """(Q,) the top answer's softmax probability at its branch's temperature (no trust scores)."""
        temps = torch.tensor([self.temperatures.get(b, 1.0) for b in branches], dtype=torch.float32)
        return top_confidence(logits, temps) if len(branches) else torch.zeros(0)

    @property
    def reads_familiarity(self) -> bool:
        """Whether its confidence needs each question's text and image (`confidence`'s questions and image_ids)."""
        return self.uses_trust and self.trust.asked is not None

    def confidence(self, logits: torch.Tensor, branches: Sequence[str], fused: torch.Tensor | None = None,
                   questions: Sequence[str] | None = None, image_ids: Sequence[str] | None = None) -> torch.Tensor:
        """(Q,) calibrated confidence of each question's top answer; `fused` (Q, F), the head's fused vectors, is
        needed when the calibration uses trust scores, and the `questions` with their images' ids
        (`vqa.trust.image_id`) when it reads familiarity."""
        conf = self.temperature_confidence(logits, branches)
        if not self.uses_trust or not len(branches):
            return conf
        if fused is None:
            raise DataError("this calibration combines confidence with trust scores, which need the head's fused "
                            "vectors (an ONNX export made before trust scores lacks them: export it again)")
        trust = self.trust.features_of(fused, logits.argmax(1), questions, image_ids)
        out = conf.numpy().astype(np.float64)
        for branch, weights in self.trust_weights.items():
            rows = np.array([x == branch for x in branches])
            out[rows] = _combined(out[rows], trust[rows], weights)
        return torch.from_numpy(out).float()

    def distribution(self, logits: torch.Tensor, branches: Sequence[str]) -> torch.Tensor:
        """(Q, A) temperature-scaled probabilities (ruled-out answers 0)."""
        temps = torch.tensor([self.temperatures.get(b, 1.0) for b in branches], dtype=torch.float32)
        scaled = (logits.float() / temps.reshape(-1, 1)).masked_fill(logits <= MASKED, float("-inf"))
        return scaled.softmax(-1)

    def threshold(self, branch: str, target_risk: TargetRisk | None = None) -> float:
        """The confidence below which a `branch` answer is withheld, for `target_risk` (default: the bundle's)."""
        risk = (target_risk or self.target_risk).of(branch)
        ev = self.evidence.get(branch)
        if not ev or not ev["confidence"]:
            return float("inf")
        return risk_threshold(np.asarray(ev["confidence"]), np.asarray(ev["correct"], dtype=float), risk)

    def with_trust(self, trust: TrustScorer | None) -> "Calibration":
        """The same calibration over another trust memory (a refit model's: its fused space is its own)."""
        return dataclasses.replace(self, trust=trust)

    def digest(self, ood=None) -> str:
        """Which calibration this is, with the out-of-scope detector beside it: a digest of its temperatures, target,
        thresholds, evidence and trust weights and of the detector's space and threshold (`fitted_on` only describes
        the data, which `medvqa calibrate` keeps when it refits)."""
        detector = None if ood is None else [ood.describe_space(), ood.threshold, ood.quantile]
        text = json.dumps({"calibration": self.to_dict(), "ood": detector}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        method = "temperature scaling of the top answer's softmax, per branch, fitted on validation"
        if self.uses_trust:
            method += ("; then sigmoid(a * logit(confidence) + b * trust + c" +
                       (" + d * familiarity + e * agreement" if self.reads_familiarity else "") +
                       ") per branch, trust the log ratio of the distances to the nearest training question with "
                       "another answer and with the answer given (trust.safetensors)" +
                       (", familiarity the largest content-word overlap with a training question about the same "
                        "image, agreement that overlap among those answered as given less among those answered "
                        "otherwise" if self.reads_familiarity else ""))
        return {"method": method, "temperatures": self.temperatures, "target_risk": self.target_risk.to_json(),
                "fitted_on": self.fitted_on, "thresholds": {b: self.threshold(b) for b in self.evidence},
                **({"trust_weights": self.trust_weights} if self.uses_trust else {}), "evidence": self.evidence}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = CALIBRATION_FILE,
                  trust: TrustScorer | None = None) -> "Calibration":
        """`trust`: the bundle's trust memory; a calibration with trust weights and no memory is refused."""
        try:
            temps = {str(k): float(v) for k, v in data["temperatures"].items()}
            evidence = {str(b): {"confidence": [float(c) for c in ev["confidence"]],
                                 "correct": [bool(c) for c in ev["correct"]]} for b, ev in data["evidence"].items()}
            weights = {str(b): [float(v) for v in w] for b, w in data.get("trust_weights", {}).items()}
            if any(len(w) not in (3, 5) for w in weights.values()):
                raise ValueError("trust_weights: expected [a, b, c] or [a, b, c, d, e] per branch")
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise DataError(f"{where}: not a medvqa calibration ({e})") from None
        if weights and trust is None:
            raise DataError(f"{where}: its confidence uses trust scores, but the bundle has no {TRUST_FILE}")
        if any(len(w) - 2 != trust.feature_count for w in weights.values()):
            raise DataError(f"{where}: its trust weights expect {len(next(iter(weights.values()))) - 2} score(s) per "
                            f"question, but {TRUST_FILE} gives {trust.feature_count}: calibrate the bundle again "
                            "(`medvqa calibrate`)")
        return cls(temps, TargetRisk.from_json(data.get("target_risk", DEFAULT_TARGET_RISK), where), evidence,
                   str(data.get("fitted_on", "validation")), weights, trust if weights else None)

    @classmethod
    def fit(cls, logits: torch.Tensor, branches: Sequence[str], correct: Sequence[bool], fitted_on: str,
            target_risk: TargetRisk | float | str | None = None, trust: TrustScorer | None = None,
            fused: torch.Tensor | None = None, scores: np.ndarray | None = None,
            questions: Sequence[str] | None = None, image_ids: Sequence[str] | None = None) -> "Calibration":
        """Temperatures and evidence from validation predictions (`correct`: the top answer was right); with a
        trust memory (the one stored) and the validation questions' fused vectors (with their texts and image ids
        where the memory reads familiarity), or their scores computed elsewhere (`scores`, (Q, feature_count):
        bagging's members score their own validation questions), the per-branch trust weights too."""
        right = np.asarray(correct, dtype=float)
        if trust is None:
            scores = None
        elif scores is None and fused is not None:
            scores = trust.features_of(fused, logits.argmax(1), questions, image_ids)
        temps, evidence, weights = {}, {}, {}
        for branch in sorted(set(branches)):
            rows = [i for i, b in enumerate(branches) if b == branch]
            temps[branch] = fit_temperature(logits[rows], right[rows])
            conf = top_confidence(logits[rows], temps[branch]).numpy()
            w = None if scores is None else fit_trust_weights(conf, scores[rows], right[rows])
            if w is not None:
                weights[branch] = w
                conf = _combined(conf, scores[rows], w)
            evidence[branch] = {"confidence": [round(float(c), 6) for c in conf],
                                "correct": [bool(c) for c in right[rows]]}
        risk = TargetRisk.given_or(target_risk, None)
        return cls(temps, risk, evidence, fitted_on, weights, trust if weights else None)


# -- metrics -----------------------------------------------------------------------------------------------------
def expected_calibration_error(conf: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by their share of questions."""
    conf, correct = np.asarray(conf, dtype=float), np.asarray(correct, dtype=float)
    if len(conf) == 0:
        return float("nan")
    index = np.minimum((conf * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        sel = index == b
        if sel.any():
            total += sel.sum() * abs(correct[sel].mean() - conf[sel].mean())
    return float(total / len(conf))


def ece_of_calibrated(conf: np.ndarray, bins: int = 15, draws: int = ECE_DRAWS, seed: int = 0) -> np.ndarray:
    """(draws,) the ECE a perfectly calibrated model with these confidences shows on this many questions: each
    answer right with probability its confidence, drawn again and again. What sampling alone gives, the floor
    a measured ECE is read against: on a few hundred questions it is several hundredths."""
    conf = np.asarray(conf, dtype=float)
    index = np.minimum((conf * bins).astype(int), bins - 1)
    onehot = np.zeros((len(conf), bins))
    onehot[np.arange(len(conf)), index] = 1.0
    rng, out = np.random.default_rng(seed), []
    for start in range(0, draws, 100):  # chunks: a large test set stays a few MB per chunk
        right = rng.uniform(size=(min(100, draws - start), len(conf))) < conf
        out.append(np.abs((right - conf) @ onehot).sum(1) / max(len(conf), 1))
    return np.concatenate(out)


def reliability(conf: np.ndarray, correct: np.ndarray, bins: int = 15) -> list[dict]:
    """Per bin: its range, count, mean confidence and accuracy (the reliability diagram's points)."""
    conf, correct = np.asarray(conf, dtype=float), np.asarray(correct, dtype=float)
    index = np.minimum((conf * bins).astype(int), bins - 1)
    out = []
    for b in range(bins):
        sel = index == b
        if sel.any():
            out.append({"low": b / bins, "high": (b + 1) / bins, "n": int(sel.sum()),
                        "confidence": float(conf[sel].mean()), "accuracy": float(correct[sel].mean())})
    return out


def risk_coverage(conf: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(coverage, risk) as answers are kept in order of confidence: the k most confident for k = 1..n."""
    order = np.argsort(-np.asarray(conf, dtype=float), kind="stable")
    wrong = np.cumsum(1 - np.asarray(correct, dtype=float)[order])
    k = np.arange(1, len(order) + 1)
    return k / max(len(order), 1), wrong / k


def coverage_at_risk(conf: np.ndarray, correct: np.ndarray, risk: float) -> float:
    """The largest share of questions answerable with at most `risk` of them wrong, by a confidence threshold (0
    when none)."""
    coverage, risks = risk_coverage(conf, correct)
    ok = (risks <= risk) & _last_of_ties(-np.sort(-np.asarray(conf, dtype=float), kind="stable"))
    return float(coverage[ok].max()) if ok.any() else 0.0


def calibration_metrics(conf: np.ndarray, correct: np.ndarray, risks: Sequence[float]) -> dict[str, Any]:
    """ECE (15 bins) and a calibrated model's on as many questions, Brier score, AURC and coverage at each of
    `risks`, for one set of questions."""
    conf, correct = np.asarray(conf, dtype=float), np.asarray(correct, dtype=float)
    if len(conf) == 0:
        return {"n": 0}
    _, risk = risk_coverage(conf, correct)
    ece, floor = expected_calibration_error(conf, correct), ece_of_calibrated(conf)
    return {"n": int(len(conf)), "accuracy": float(correct.mean()), "ece": ece,
            # a perfectly calibrated model's ECE here (mean, 90th percentile) and the share of its draws at or
            # above the measured one: a small share is miscalibration the test can see, a large one is noise
            "ece_if_calibrated": {"mean": float(floor.mean()), "p90": float(np.percentile(floor, 90)),
                                  "share_at_or_above": float((floor >= ece - 1e-12).mean())},
            "brier": float(((conf - correct) ** 2).mean()), "aurc": float(risk.mean()),
            "coverage_at_risk": {f"{r:g}": coverage_at_risk(conf, correct, r) for r in risks}}


def apply_calibration(calibration: Calibration | None, ood, preds, pooled: torch.Tensor,
                      target_risk: TargetRisk | None = None, blank: torch.Tensor | None = None,
                      questions: Sequence[str] | None = None, image_ids: Sequence[str] | None = None,
                      unfamiliar: torch.Tensor | None = None) -> None:
    """Fill `preds.confidence`, `preds.abstained` and `preds.out_of_scope` (nothing without a calibration):
    an answer is withheld below its branch's threshold at `target_risk` (default: the calibration's), when its
    image is out of scope: far from the training images (`ood`, a `vqa.ood.OutOfScopeDetector`, on the
    images' pooled features) or blank (`blank`, (Q,) bool, `vqa.ood.blank_images`), or when its question is
    mostly unknown words (`unfamiliar`, (Q,) bool, `vqa.ood.unfamiliar_questions`). `questions` and their images'
    `image_ids`: for a calibration that reads familiarity."""
    if calibration is None:
        return
    branches = preds.branches()
    preds.confidence = calibration.confidence(preds.logits, branches, preds.fused, questions, image_ids)
    thresholds = {b: calibration.threshold(b, target_risk) for b in set(branches)}
    below = torch.tensor([float(c) < thresholds[b] for c, b in zip(preds.confidence, branches)], dtype=torch.bool)
    preds.out_of_scope = ood.out_of_scope(pooled) if ood is not None else torch.zeros_like(below)
    if blank is not None:
        preds.out_of_scope = preds.out_of_scope | blank
    preds.abstained = below | preds.out_of_scope | (unfamiliar if unfamiliar is not None else False)
