"""Heads created by name (timm's register_model / create_model), and rebuilt from a dict."""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Callable, Mapping

from torch import nn

from .base import VQAHead, create_question_encoder, question_encoder_spec

_HEADS: dict[str, type[VQAHead]] = {}


def register_head(name: str) -> Callable[[type[VQAHead]], type[VQAHead]]:
    """Class decorator: make a `VQAHead` subclass available to `create_head(name, ...)`."""

    def decorator(cls: type[VQAHead]) -> type[VQAHead]:
        if name in _HEADS:
            raise ValueError(f"head {name!r} is already registered by {_HEADS[name].__qualname__}")
        cls.name = name
        _HEADS[name] = cls
        return cls

    return decorator


def list_heads(pattern: str = "*", trainable_only: bool = True) -> list[str]:
    """Registered head names matching a shell-style pattern, sorted: those `medvqa train` trains, or all of them."""
    return sorted(n for n, cls in _HEADS.items() if fnmatch.fnmatch(n, pattern) and (cls.trainable or not trainable_only))


def get_head_class(name: str) -> type[VQAHead]:
    if name not in _HEADS:
        raise ValueError(f"unknown head {name!r}; known heads: {', '.join(list_heads(trainable_only=False))}")
    return _HEADS[name]


def create_head(
    name: str,
    *,
    feature_dim: int,
    vocab_sizes: Mapping[str, int],
    question_encoder: nn.Module | Any,
    **kw: Any,
) -> VQAHead:
    """Build head `name` over image features of size `feature_dim`.

    `vocab_sizes` holds at least `{"answers": A}`. `question_encoder` is a built
    encoder module, its config dataclass, or a `question_encoder_spec` dict.
    `kw` are fields of the head's config dataclass (`list_heads()` names the heads;
    `get_head_class(name).config_class` the fields).
    """
    cls = get_head_class(name)
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    unknown = sorted(set(kw) - fields)
    if unknown:
        raise ValueError(f"head {name!r} has no config fields {unknown}; its fields: {sorted(fields)}")
    if "answers" not in vocab_sizes:
        raise ValueError(f"vocab_sizes needs an 'answers' entry, got {dict(vocab_sizes)}")
    config = cls.config_class(**kw)
    return cls(
        config,
        feature_dim=int(feature_dim),
        vocab_sizes={k: int(v) for k, v in vocab_sizes.items()},
        question_encoder=create_question_encoder(question_encoder),
    )


def head_to_dict(head: VQAHead) -> dict[str, Any]:
    """Everything needed to rebuild `head`'s architecture (JSON-serialisable); weights apart."""
    return {
        "name": head.name,
        "feature_dim": head.feature_dim,
        "vocab_sizes": dict(head.vocab_sizes),
        "config": dataclasses.asdict(head.config),
        "question_encoder": question_encoder_spec(head.question_encoder),
    }


def head_from_dict(spec: Mapping[str, Any], question_encoder: nn.Module | None = None) -> VQAHead:
    """Inverse of `head_to_dict`: the same architecture, freshly initialised (load the state dict next).

    A question encoder built outside `heads` (spec type "module") is rebuilt by the caller and passed in."""
    return create_head(
        spec["name"],
        feature_dim=spec["feature_dim"],
        vocab_sizes=spec["vocab_sizes"],
        question_encoder=spec["question_encoder"] if question_encoder is None else question_encoder,
        **spec["config"],
    )
