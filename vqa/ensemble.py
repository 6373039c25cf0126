"""Deep ensembles as bundles (`medvqa ensemble`): several trained bundles answer as one.

    bundle = build_ensemble(EnsembleConfig(members=["runs/s0/bundle", "runs/s10/bundle", "runs/s20/bundle"],
                                           format="vqa-rad", data="path/to/vqa-rad", out="runs/ensemble"))

The members are bundles of one recipe trained with different seeds on the same data, image encoder,
tokenizer, answer vocabulary and validation split (`medvqa train --seed S --val-seed V`: the seed
changes the initialisation and the batch order, the validation carve stays put). The ensemble's
head (`heads.EnsembleHead`) averages their answer distributions. Its calibration is fitted as for
any bundle, on that shared validation split, which none of the members trained on: so the ensemble's
confidence and abstention stay honest. Members with different validation splits are refused (each
would have trained on another's validation questions). The result is an ordinary bundle: `eval`,
`predict`, the demo, `export onnx` and `push` take it as they take any other.

Trust scores (`vqa.trust`), where the members output fused vectors: the ensemble's memory holds its own
fused vectors (the members', side by side) of the training questions it answers over, and the weights
combining trust with confidence are fitted on validation as for one model. A bagging ensemble has no
validation question none of its members trained on: its confidence is fitted, split by split, on the
answers of the members held out on that split (one member, or the mean of several trained on the same
carve), and its trust weights on their trust scores there, from their own memories (a proxy, as the
held-out members' answers are for the ensemble's).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .answers import AnswerVocab
from .bundle import Bundle, check_weights_dtype, load as load_bundle, round_weights, save as save_bundle
from .calibration import Calibration
from .errors import DataError
from .evaluate import predict_records
from .inference import ANSWER_PRECISION, Predictions, routed_types
from .io import hash_file
from .metrics import vqa_metrics
from .model import VQAModel
from .model_card import training_data
from .recalibrate import trust_memory
from .target_risk import TargetRisk
from .trust import asked_about
from .training.precision import resolve_device

log = logging.getLogger(__name__)


@dataclass
class EnsembleConfig:
    members: Sequence[str]  # bundle folders (or Hub ids), at least 2
    out: str = "runs/ensemble"  # OUT/bundle is written
    format: str = "vqa-rad"  # the members' training data, to rebuild their validation split
    data: str = "runs/phantom/vqa-rad"
    # The validation split, when the members do not record it (bundles from before `--val-seed`); checked
    # against the description every member records. None: the members' own record.
    val_split: str | None = None  # a split name, "carved" or "auto"
    val_fraction: float | None = None
    val_by: str | None = None
    val_seed: int | None = None
    target_risk: TargetRisk | float | str | None = None  # abstention target (default: the first member's)
    # Bagging: members trained on different validation carves (each on a different 90% of the training split), so
    # that together they have trained on all of it; calibrated on each member's own validation answers.
    bagging: bool = False
    weights_dtype: str = "float32"  # float16 halves the bundle; the members are rounded before calibration
    device: str = "auto"  # calibrated in fp32, the precision the bundle answers in (ANSWER_PRECISION)
    cache_dir: str | None = None
    progress: bool = True


def build_ensemble(cfg: EnsembleConfig) -> Path:
    """Check the members agree, average them, calibrate on their validation split; returns OUT/bundle."""
    from heads import create_head, head_to_dict

    from .hub import resolve_bundle
    from .model_card import write_card

    if len(cfg.members) < 2:
        raise DataError(f"an ensemble needs at least 2 member bundles, got {len(cfg.members)}")
    if cfg.bagging and any(v is not None for v in (cfg.val_split, cfg.val_fraction, cfg.val_by, cfg.val_seed)):
        raise DataError("--bagging reads each member's own validation split from its bundle: the --val-* options "
                        "would name one split for all")
    device = resolve_device(cfg.device)
    paths = [Path(resolve_bundle(m)) for m in cfg.members]
    check_weights_dtype(cfg.weights_dtype)
    members = [load_bundle(p, device) for p in paths]
    check_members(paths, members, same_split=not cfg.bagging)
    for member in members:  # what is calibrated below is what the bundle will hold
        round_weights(member.model.head, cfg.weights_dtype)
    first, heads = members[0], [m.model.head for m in members]
    answers = AnswerVocab.union([m.answers for m in members])
    columns = [[answers.index(a) for a in m.answers.answers] for m in members]
    same = all(c == list(range(len(answers))) for c in columns)
    head = create_head("ensemble", feature_dim=heads[0].feature_dim,
                       vocab_sizes={**heads[0].vocab_sizes, "answers": len(answers)},
                       question_encoder=heads[0].question_encoder, members=[head_to_dict(h) for h in heads],
                       score=first.score_kind, columns=[] if same else columns, route_by_mean_type=True)
    head.load_member_states([h.state_dict() for h in heads])
    model = VQAModel(first.model.encoder, head, first.model.image_features).to(device).eval()
    ensemble = Bundle(answers=answers, tokenizer=first.tokenizer, config=first.config, metrics={}, model=model)
    risk = TargetRisk.given_or(cfg.target_risk, first.calibration and first.calibration.target_risk)
    if cfg.bagging:
        calibration, validation, how = _cross_fitted(paths, members, ensemble, cfg, device, risk)
    else:
        given = {"split": cfg.val_split, "fraction": cfg.val_fraction, "by": cfg.val_by, "seed": cfg.val_seed}
        train, val, how = recorded_splits(paths[0], first, cfg.format, cfg.data,
                                          {k: v for k, v in given.items() if v is not None})
        trust = trust_memory(ensemble, train, device, cfg.cache_dir, cfg.progress)
        log.info("ensemble of %d members; calibrating on validation %s (%d questions)", len(members), how, len(val))
        preds = predict_records(ensemble, val, device, ANSWER_PRECISION, cfg.cache_dir, cfg.progress)
        correct = [p == r.answer for p, r in zip(preds.answers, val)]
        calibration = Calibration.fit(preds.logits, preds.branches(), correct, f"validation {how}", risk,
                                      trust=trust, fused=preds.fused, **asked_about(trust, val))
        validation = vqa_metrics(val, preds.answers, preds.types)
    log.info("validation overall: ensemble %.4f, members %s", validation["overall"],
             ", ".join(f"{(m.metrics.get('validation') or {}).get('overall', float('nan')):.4f}" for m in members))
    selection = first.metrics.get("protocol", {}).get("model_selection", "unknown")
    metrics = {"validation": validation,
               "members": [{"bundle": str(p), "validation": m.metrics.get("validation"),
                            "best_epoch": m.metrics.get("best_epoch"),
                            "numerics": m.config.get("training", {}).get("numerics")} for p, m in zip(paths, members)],
               "protocol": {"answers": answers.protocol, "validation": how,
                            "model_selection": f"each member's own: {selection}; the members' answer "
                                               "distributions averaged"}}
    training = {**{k: v for k, v in first.config.get("training", {}).items() if k != "numerics"},  # in members
                "loss": first.loss,  # recorded even where members predate it: their default, not the ensemble's
                "ensemble": {"members": len(members), "bagging": cfg.bagging}}
    bundle = save_bundle(model, Path(cfg.out) / "bundle", answers=answers, tokenizer=first.tokenizer,
                         metrics=metrics, max_len=first.max_len, choice_len=first.choice_len,
                         extra={"training": training}, calibration=calibration, ood=first.ood,
                         weights_dtype=cfg.weights_dtype)
    write_card(bundle)
    return bundle


def _cross_fitted(paths: Sequence[Path], members: Sequence[Bundle], ensemble: Bundle, cfg: EnsembleConfig,
                  device, risk: TargetRisk) -> tuple[Calibration, dict, str]:
    """Bagging: the ensemble has no validation question that none of its members trained on, so its calibration
    is fitted, split by split, on the answers of the members held out on it (one, or several trained on the same
    carve: their mean distribution, as the ensemble answers), pooled and mapped onto the ensemble's answers, with
    their trust scores from their own memories (averaged) where every member has one: (calibration, the pooled
    validation metrics, the description)."""
    with_trust = ensemble.model.head.has_fused_output and all(m.calibration and m.calibration.uses_trust
                                                              for m in members)
    # familiarity only where every member's memory has it (members trained before it score trust alone)
    familiar = with_trust and all(m.calibration.reads_familiarity for m in members)
    held_out: dict[str, tuple[list, list]] = {}  # split description -> (its records, [(a member's preds, member)])
    for path, member in zip(paths, members):
        train, val, how = recorded_splits(path, member, cfg.format, cfg.data)
        everything = train + val  # any member's: together the members trained on all of the training split
        preds = predict_records(member, val, device, ANSWER_PRECISION, cfg.cache_dir, cfg.progress, branches=True)
        held_out.setdefault(how, (val, []))[1].append((preds, member))
    logits, branches, correct, records, given, types, scores = [], [], [], [], [], [], []
    for val, group in held_out.values():
        joint = _held_out_answers(group, ensemble.answers)
        logits.append(joint.logits)
        branches += joint.branches()
        correct += [a == r.answer for a, r in zip(joint.answers, val)]
        records += val
        given += joint.answers
        types += joint.types or [None] * len(val)
        if with_trust:
            # with a member from before familiarity, every member scores trust alone, and no image is read
            memories = [m.calibration.trust if familiar else dataclasses.replace(m.calibration.trust, asked=None)
                        for _, m in group]
            asked = asked_about(memories[0], val)
            scores.append(np.stack([memory.features_of(p.fused, p.logits.argmax(1), **asked)
                                    for memory, (p, _) in zip(memories, group)]).mean(0))
    how = "each member's own, the answers of the members held out on it pooled: " + "; ".join(held_out)
    log.info("bagging %d members; calibrating on their out-of-fold validation answers (%d questions, %d splits)",
             len(members), len(records), len(held_out))
    trust = None
    if with_trust:
        trust = trust_memory(ensemble, everything, device, cfg.cache_dir, cfg.progress,
                             familiarity=familiar)
    elif ensemble.model.head.has_fused_output:
        log.warning("no trust scores: a member has no trust memory (trained before trust scores; `medvqa calibrate` "
                    "gives it one)")
    calibration = Calibration.fit(torch.cat(logits), branches, correct, f"validation {how}", risk, trust=trust,
                                  scores=np.concatenate(scores) if trust is not None else None)
    return calibration, vqa_metrics(records, given, types if None not in types else None), how


def _held_out_answers(group: Sequence[tuple[Predictions, Bundle]], answers: AnswerVocab) -> Predictions:
    """The members held out on one split (with their predictions there) answering as an ensemble of them
    (`heads.ensemble`): their mean answer distribution over the ensemble's `answers`; with a type router, each
    branch's mean, the question routed by their mean type."""
    from heads.ensemble import mean_answer_logits, routed_mean

    cols = [torch.tensor([answers.index(a) for a in m.answers.answers]) for _, m in group]
    kind = group[0][1].score_kind
    routed = (None if any(p.type_probs is None for p, _ in group) else
              torch.stack([p.type_probs for p, _ in group]).mean(0))
    if routed is None:
        mean = mean_answer_logits([p.logits for p, _ in group], cols, len(answers), kind)
    else:
        mean = routed_mean(routed, [p.branch_logits[:, 0] for p, _ in group], [p.branch_logits[:, 1] for p, _ in group],
                           cols, len(answers), kind)[0]
    return Predictions([answers.answers[i] for i in mean.argmax(1).tolist()], routed_types(routed), mean,
                       torch.zeros(len(mean), 0), routed)


def check_members(paths: Sequence[Path], members: Sequence[Bundle], same_split: bool = True) -> None:
    """Members must agree on everything but their weights (and, bagging, their validation split and the answers it
    left them): a DataError names the first member that differs."""
    def facts(path: Path, bundle: Bundle) -> dict[str, Any]:
        training = bundle.config.get("training", {})
        return {"validation split": bundle.metrics.get("protocol", {}).get("validation"),
                "training data": training.get("data"),
                "image encoder": _folder_digest(path / "encoder"),
                "image features": bundle.model.image_features,
                "question tokenizer": (bundle.config["tokenizer"], _tokenizer_digest(path, bundle)),
                "answer vocabulary": (bundle.answers.protocol, list(bundle.answers.answers) if same_split else None),
                "training loss": bundle.loss}

    for path, bundle in zip(paths, members):
        if "refit" in bundle.metrics:
            raise DataError(f"{path}: trained again on its validation split (--refit), so no question is left to "
                            "calibrate an ensemble on; ensemble the validation runs (without --refit)")
    expected = facts(paths[0], members[0])
    if not same_split:
        del expected["validation split"]
    elif expected["validation split"] is None:
        raise DataError(f"{paths[0] / 'metrics.json'}: records no validation split; an ensemble is calibrated on "
                        "its members' shared validation split")
    for path, bundle in zip(paths[1:], members[1:]):
        got = facts(path, bundle)
        for what, value in expected.items():
            if got[what] != value:
                hint = (" (train the members with one --val-seed and different --seed, or build a bagging "
                        "ensemble of members on different carves: --bagging)" if what == "validation split" else "")
                raise DataError(f"{path}: its {what} differs from {paths[0]}'s "
                                f"({_short(got[what])} against {_short(value)}): ensemble members must share it{hint}")
    if same_split:  # the description rounds the fraction (10% of 0.096 and of 0.1): the recorded one decides
        carved = [(path, (b.config.get("training", {}).get("validation") or {}).get("fraction"))
                  for path, b in zip(paths, members)]
        carved = [(path, f) for path, f in carved if f is not None]  # members from before it was recorded
        for path, fraction in carved[1:]:
            if fraction != carved[0][1]:
                raise DataError(f"{path}: its validation split was carved with --val-fraction {fraction}, "
                                f"{carved[0][0]}'s with {carved[0][1]}: ensemble members must share it")
    if any(m.model.head.needs_choices for m in members):
        raise DataError(f"{paths[0]}: multiple-choice heads cannot be ensembled over an answer vocabulary")


def recorded_splits(path: Path, bundle: Bundle, fmt: str, data: str, given: dict[str, Any] | None = None):
    """The bundle's training and validation questions, rebuilt from what the bundle records (or `given`: split,
    fraction, by, seed), and checked against the description it recorded when it trained; (train, val,
    description)."""
    from .train import TrainConfig, load_splits

    training = bundle.config.get("training", {})
    recorded = bundle.metrics.get("protocol", {}).get("validation")
    spec, source = {**_parse_carve(recorded), **training.get("validation", {}), **(given or {})}, training.get("data") or {}
    missing = [k for k in ("split", "fraction", "by", "seed") if k not in spec]
    if missing:
        raise DataError(f"{path / 'config.json'}: does not record how its validation split was made (a bundle from "
                        f"before --val-seed): pass --val-{' --val-'.join(missing)} as it was trained "
                        f"({bundle.metrics.get('protocol', {}).get('validation', 'unknown')})")
    if source and training_data(fmt, data, source.get("split", "train"), source.get("lang", "en")) != source:
        raise DataError(f"{data} (--format {fmt}): not the data {path} was trained on ({_short(source)})")
    cfg = TrainConfig(format=fmt, data=data, train_split=source.get("split", "train"), lang=source.get("lang", "en"),
                      val_split=spec["split"], val_fraction=spec["fraction"], val_by=spec["by"], val_seed=spec["seed"])
    train, val, how = load_splits(cfg)
    if how != recorded:
        raise DataError(f"{path}: its validation split was {recorded!r}, but these settings carve {how!r} "
                        f"from {data}")
    if not val:
        raise DataError(f"{data}: the validation split ({how}) has no questions")
    evidence = bundle.calibration.evidence if bundle.calibration else {}
    fitted = sum(len(e["confidence"]) for e in evidence.values())
    if evidence and fitted != len(val):  # the description rounds the fraction: the count pins the carve down
        raise DataError(f"{path}: calibrated on {fitted} validation questions, but {how} holds {len(val)}")
    return train, val, how


# What `vqa.train.load_splits` records of a carve (bundles from before the settings themselves were recorded).
CARVE_DESCRIPTION = re.compile(r"carved from \S+ \((?P<percent>\d+)% of (?P<by>image|question)s, seed (?P<seed>-?\d+)\)")


def _parse_carve(description: str | None) -> dict[str, Any]:
    """The carve's settings from its description (checked afterwards by carving again); {} if it is not one."""
    match = CARVE_DESCRIPTION.fullmatch(description or "")
    if not match:
        return {}
    return {"split": "carved", "fraction": int(match["percent"]) / 100, "by": match["by"], "seed": int(match["seed"])}


def _folder_digest(folder: Path) -> str:
    """One digest of a folder's files (names and bytes)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(file.relative_to(folder).as_posix().encode())
        hash_file(digest, file)
    return digest.hexdigest()


def _tokenizer_digest(path: Path, bundle: Bundle) -> str:
    kind = bundle.config["tokenizer"].get("type", "words")
    return _folder_digest(path / bundle.config["tokenizer"].get("folder", "tokenizer")) if kind == "text-tower" else \
        hashlib.sha256((path / "vocab.json").read_bytes()).hexdigest()


def _short(value: Any, limit: int = 120) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit] + "..."
