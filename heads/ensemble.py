"""A deep ensemble: several trained heads over one image encoder, their answer distributions averaged.

    head = create_head("ensemble", feature_dim=1280, vocab_sizes={"answers": 440}, question_encoder=tower,
                       members=[head_to_dict(h) for h in trained], score="softmax")
    head.load_member_states([h.state_dict() for h in trained])
    out = head(features, tokens, lengths)   # {"logits": log of the mean distribution, "attention", ["type_logits"]}

Members are heads trained on the same data (and answer vocabulary) with different seeds. Each scores
every answer as it was trained to (a softmax after cross-entropy, per-answer sigmoids after BCE:
`score`); the ensemble's logits are the log of the members' mean probabilities (the logit of the
mean sigmoid for "sigmoid"), so `softmax(logits)` is the average distribution and a temperature
fitted on it (vqa.calibration) calibrates the ensemble as a whole. An answer every member ruled out
(a QCR branch's other group) stays ruled out (MASKED_LOGIT). `medvqa ensemble` builds one as a bundle.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from ._registry import head_from_dict, register_head
from .base import VQAHead
from .layers import MASKED_LOGIT

SCORES = ("softmax", "sigmoid")


@dataclass
class EnsembleHeadConfig:
    members: list[dict[str, Any]] = field(default_factory=list)  # each member's `head_to_dict`
    score: str = "softmax"  # how each member scores answers: its training loss's ("ce": softmax, "bce": sigmoid)


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
        kinds = {(m["name"], m["feature_dim"], m["vocab_sizes"]["answers"]) for m in config.members}
        if len({k[1:] for k in kinds}) != 1 or (feature_dim, self.num_answers) != next(iter(kinds))[1:]:
            raise ValueError(f"ensemble members must share the feature size and answer count "
                             f"({feature_dim}, {self.num_answers}); got (head, features, answers) {sorted(kinds)}")
        routers = {m["name"] for m in config.members}
        self.members = nn.ModuleList(self._member(spec, question_encoder, i) for i, spec in enumerate(config.members))
        self.has_type_router = all(m.has_type_router for m in self.members)
        if any(m.needs_choices for m in self.members):
            raise ValueError(f"multiple-choice heads cannot form an answer ensemble (members: {sorted(routers)})")
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

    def load_member_states(self, states: list[Mapping[str, torch.Tensor]]) -> None:
        """Each member's trained weights, in order."""
        if len(states) != len(self.members):
            raise ValueError(f"{len(states)} member states for {len(self.members)} members")
        for member, state in zip(self.members, states):
            member.load_state_dict(state)

    def forward(self, features: Mapping[str, torch.Tensor], question_tokens: torch.Tensor,
                lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        outs = [member(features, question_tokens, lengths) for member in self.members]
        ruled_out = torch.stack([o["logits"] <= MASKED_LOGIT / 10 for o in outs]).all(0)  # (B, A)
        if self.config.score == "softmax":
            probs = torch.stack([o["logits"].float().softmax(-1) for o in outs]).mean(0)
            logits = probs.clamp_min(torch.finfo(torch.float32).tiny).log()
        else:
            probs = torch.stack([o["logits"].float().sigmoid() for o in outs]).mean(0)
            logits = torch.logit(probs, eps=1e-7)
        result = {"logits": logits.masked_fill(ruled_out, MASKED_LOGIT),
                  "attention": torch.stack([o["attention"].float() for o in outs]).mean(0)}
        if self.has_type_router:
            routed = torch.stack([o["type_logits"].float().softmax(-1) for o in outs]).mean(0)
            result["type_logits"] = routed.clamp_min(torch.finfo(torch.float32).tiny).log()
        return result
