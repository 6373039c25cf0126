"""A deep ensemble: several trained heads over one image encoder, their answer distributions averaged.

    head = create_head("ensemble", feature_dim=1280, vocab_sizes={"answers": 440}, question_encoder=tower,
                       members=[head_to_dict(h) for h in trained], score="softmax")
    head.load_member_states([h.state_dict() for h in trained])
    out = head(features, tokens, lengths)   # {"logits": log of the mean distribution, "attention",
                                            #  ["type_logits", "closed_logits", "open_logits"], ["fused"]}

Members are heads trained on the same data (and answer vocabulary) with different seeds. Each scores
every answer as it was trained to (a softmax after cross-entropy, per-answer sigmoids after BCE:
`score`); the ensemble's logits are the log of the members' mean probabilities (the logit of the
mean sigmoid for "sigmoid"), so `softmax(logits)` is the average distribution and a temperature
fitted on it (vqa.calibration) calibrates the ensemble as a whole. An answer every member ruled out
(a QCR branch's other group) stays ruled out (MASKED_LOGIT). Members with a type router (QCR) have each
branch averaged apart, and the question goes to the branch of their mean type (`routed_mean`), as one routed
head's would; ensembles built before that (`route_by_mean_type` false in their config) averaged each member's
own routed answer, and keep doing so, as their calibration and any ONNX export of them were made on it. The
attention map and fused vector are the members' own routed ones either way (the members output no others).
`medvqa ensemble` builds one as a bundle.

Where every member outputs its fused vector, the ensemble's is theirs side by side, each scaled to
length 1/sqrt(M): a unit vector whose squared distance to another is the mean of the members'
squared distances (between their unit vectors), so the trust scores' nearest training question
(`vqa.trust`) is the nearest on average over the members' spaces.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from ._registry import head_from_dict, register_head
from .base import CLOSED, VQAHead
from .layers import MASKED_LOGIT

SCORES = ("softmax", "sigmoid")


@dataclass
class EnsembleHeadConfig:
    members: list[dict[str, Any]] = field(default_factory=list)  # each member's `head_to_dict`
    score: str = "softmax"  # how each member scores answers: its training loss's ("ce": softmax, "bce": sigmoid)
    # Per member, the ensemble's index of each of its answers, when the members' vocabularies differ (members trained
    # on different carves of one training split); empty: every member answers over the ensemble's vocabulary.
    columns: list[list[int]] = field(default_factory=list)
    # Routed members (QCR): each branch averaged, then the members' mean type routes (`routed_mean`). False in the
    # config of an ensemble built before: each member's own routed answer averaged.
    route_by_mean_type: bool = False


@register_head("ensemble")
class EnsembleHead(VQAHead):
    """The mean answer distribution of `config.members` (see the module docstring)."""

    config_class = EnsembleHeadConfig
    default_loss = "ce"
    trainable = False  # built from trained members (`medvqa ensemble`), never trained itself

    def __init__(self, config: EnsembleHeadConfig, *, feature_dim: int, vocab_sizes: Mapping[str, int],
                 question_encoder: nn.Module) -> None:
        super().__init__(config, feature_dim=feature_dim, vocab_sizes=vocab_sizes, question_encoder=question_encoder)
        if len(config.members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(config.members)}")
        if config.score not in SCORES:
            raise ValueError(f"ensemble score must be one of {SCORES}, got {config.score!r}")
        sizes = [m["vocab_sizes"]["answers"] for m in config.members]
        columns = config.columns or [list(range(self.num_answers))] * len(config.members)
        if len(columns) != len(config.members) or [len(c) for c in columns] != sizes or any(
                c and not 0 <= min(c) <= max(c) < self.num_answers for c in columns):
            raise ValueError(f"ensemble members answer over {sizes} answers, which `columns` must map into the "
                             f"ensemble's {self.num_answers}")
        if {m["feature_dim"] for m in config.members} != {feature_dim}:
            raise ValueError(f"ensemble members must all read {feature_dim}-d image features, got "
                             f"{sorted({m['feature_dim'] for m in config.members})}")
        self.members = nn.ModuleList(self._member(spec, question_encoder, i) for i, spec in enumerate(config.members))
        for i, cols in enumerate(columns):  # not weights: rebuilt from the config
            self.register_buffer(f"columns{i}", torch.tensor(cols, dtype=torch.long), persistent=False)
        self.has_type_router = all(m.has_type_router for m in self.members)
        if any(m.needs_choices for m in self.members):
            names = sorted({m["name"] for m in config.members})
            raise ValueError(f"multiple-choice heads cannot form an answer ensemble (members: {names})")
        # The tokenizer's module is member 0's question encoder: registered once, under members.0, so that the
        # weights are stored once and safetensors (which refuses shared tensors) can write them.
        del self._modules["question_encoder"]
        self.__dict__["question_encoder"] = self.members[0].question_encoder

    @staticmethod
    def _member(spec: Mapping[str, Any], question_encoder: nn.Module, index: int) -> VQAHead:
        """Member `index`: a built-in question encoder is rebuilt from its spec; a text tower (built outside
        `heads`) is member 0's module, copied for the others (each member has its own fine-tuned weights)."""
        if spec["question_encoder"].get("type") == "module":
            return head_from_dict(spec, question_encoder if index == 0 else copy.deepcopy(question_encoder))
        return head_from_dict(spec)

    @property
    def has_fused_output(self) -> bool:  # an instance's capability: its members'
        return all(m.has_fused_output for m in self.members)

    def load_member_states(self, states: list[Mapping[str, torch.Tensor]]) -> None:
        """Each member's trained weights, in order."""
        if len(states) != len(self.members):
            raise ValueError(f"{len(states)} member states for {len(self.members)} members")
        for member, state in zip(self.members, states):
            member.load_state_dict(state)

    def forward(self, features: Mapping[str, torch.Tensor], question_tokens: torch.Tensor,
                lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        outs = [member(features, question_tokens, lengths) for member in self.members]
        columns = [getattr(self, f"columns{i}") for i in range(len(outs))]
        result = {"attention": torch.stack([o["attention"].float() for o in outs]).mean(0)}
        if self.has_type_router:
            routed = torch.stack([o["type_logits"].float().softmax(-1) for o in outs]).mean(0)
            result["type_logits"] = routed.clamp_min(torch.finfo(torch.float32).tiny).log()
        if self.has_type_router and self.config.route_by_mean_type:
            result["logits"], result["closed_logits"], result["open_logits"] = routed_mean(
                routed, [o["closed_logits"] for o in outs], [o["open_logits"] for o in outs], columns,
                self.num_answers, self.config.score)
        else:
            result["logits"] = mean_answer_logits([o["logits"] for o in outs], columns, self.num_answers,
                                                  self.config.score)
        if self.has_fused_output:
            scale = 1.0 / math.sqrt(len(outs))
            result["fused"] = torch.cat([nn.functional.normalize(o["fused"].float(), dim=-1) * scale for o in outs], -1)
        return result


def routed_mean(type_probs: torch.Tensor, closed: list[torch.Tensor], opened: list[torch.Tensor],
                columns: list[torch.Tensor], num_answers: int, score: str = "softmax"
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, closed, open) of routed members answering together: each branch's members' mean
    (`mean_answer_logits`), each question answered by the branch of the members' mean type `type_probs` (B, 2).
    Averaging each member's own routed answer instead would mix a closed and an open distribution wherever members
    route a question apart."""
    closed_mean = mean_answer_logits(closed, columns, num_answers, score)
    open_mean = mean_answer_logits(opened, columns, num_answers, score)
    is_closed = (type_probs.argmax(-1) == CLOSED).unsqueeze(-1)
    return torch.where(is_closed, closed_mean, open_mean), closed_mean, open_mean


def mean_answer_logits(member_logits: list[torch.Tensor], columns: list[torch.Tensor], num_answers: int,
                       score: str = "softmax") -> torch.Tensor:
    """(B, num_answers) logits of the members' mean answer distribution: member i's (B, A_i) logits score its
    answers, which are the ensemble's answers `columns[i]`; an answer no member allows stays MASKED_LOGIT."""
    batch, device = member_logits[0].shape[0], member_logits[0].device
    probs = torch.zeros(batch, num_answers, device=device)
    allowed = torch.zeros(batch, num_answers, device=device)  # how many members allow each answer
    for logits, cols in zip(member_logits, columns):
        logits = logits.float()
        probs = probs.index_add(1, cols, logits.softmax(-1) if score == "softmax" else logits.sigmoid())
        allowed = allowed.index_add(1, cols, (logits > MASKED_LOGIT / 10).float())
    probs = probs / len(member_logits)
    mean = probs.clamp_min(torch.finfo(torch.float32).tiny).log() if score == "softmax" else torch.logit(probs, eps=1e-7)
    return mean.masked_fill(allowed == 0, MASKED_LOGIT)
