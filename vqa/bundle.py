"""A trained model as a self-describing folder, loaded without unpickling anything.

    bundle/
      config.json        encoder + head architecture, tokenizer, answers, medvqa version
      model.safetensors  head weights (question encoder, fusion, classifiers)
      encoder/           the image encoder (its own config.json + model.safetensors)
      answers.json       answer vocabulary and the protocol that built it
      vocab.json         question words (a word-embedding question encoder), or
      tokenizer/         the tokenizer files of a pretrained text tower used as the question encoder
      metrics.json       validation metrics and training history
      calibration.json   temperatures and abstention evidence, fitted on validation (vqa.calibration)
      ood.safetensors    the out-of-scope image detector, fitted on the training images (vqa.ood)
      ood_encoder/       its own image encoder, where it does not read the model's (usually a reference)
      trust.safetensors  the training questions' fused vectors and answers, for trust scores, and the words
                         asked about each training image, for familiarity (vqa.trust)
      README.md          the model card, in the Hugging Face Hub's conventions (vqa.model_card)
      run_config.json    the training recipe, local paths reduced to "local:NAME" (`medvqa train --config BUNDLE`)
      onnx/              optional: the ONNX export for onnxruntime (`medvqa export onnx`, vqa.onnx_export)

Bundles written before calibration existed load too: they answer uncalibrated and never abstain.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from . import __version__
from .answers import AnswerVocab
from .calibration import CALIBRATION_FILE, Calibration
from .errors import DataError
from .io import atomic_dir, atomic_write_json, atomic_write_safetensors, hash_file, read_json
from .model import VQAModel
from .ood import OutOfScopeDetector
from .trust import TrustScorer
from .batches import Tokenizer
from .text import WordVocab

log = logging.getLogger(__name__)
REQUIRED = ("config.json", "model.safetensors", "answers.json", "encoder/config.json")
DIGESTED = ("model.safetensors", "answers.json")  # the head's weights (each trained model's own) and its answers
TOKENIZER_FOLDER = "tokenizer"


@dataclass
class BundleFiles:
    """Everything in a bundle but the network: what answering needs besides running the model.

    An ONNX export (`vqa.onnx_export`) holds the same files, so both runtimes read them through `load_files`."""

    answers: AnswerVocab
    tokenizer: Tokenizer  # WordVocab, or the text-tower question encoder (its own tokenizer)
    config: dict[str, Any]
    metrics: dict[str, Any]
    calibration: Calibration | None = None  # None: a bundle from before calibration (uncalibrated)
    ood: OutOfScopeDetector | None = None

    @property
    def max_len(self) -> int:
        return int(self.config["tokenizer"]["max_len"])

    @property
    def choice_len(self) -> int:
        return int(self.config["tokenizer"].get("choice_len", 8))

    def training_loss(self, default: str) -> str:
        """The loss the head was trained with; `default` (the head's own) for bundles from before it was recorded."""
        return self.config.get("training", {}).get("loss", default)


@dataclass(kw_only=True)
class Bundle(BundleFiles):
    model: VQAModel

    @property
    def loss(self) -> str:
        """The loss the head was trained with (bundles from before it was recorded: the head's default)."""
        return self.training_loss(self.model.head.default_loss)

    @property
    def score_kind(self) -> str:
        """Scores follow the training loss: per-answer sigmoids after BCE, a softmax after cross-entropy."""
        return score_kind(self.loss, self.model.head.needs_choices)


def score_kind(loss: str, needs_choices: bool = False) -> str:
    """"softmax" over the choices of multiple-choice heads and after cross-entropy; "sigmoid" after BCE."""
    return "softmax" if needs_choices or loss == "ce" else "sigmoid"


WEIGHTS_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def check_weights_dtype(weights_dtype: str) -> torch.dtype:
    """The torch dtype of a bundle's stored head weights, or a DataError naming what is accepted."""
    if weights_dtype not in WEIGHTS_DTYPES:
        raise DataError(f"--weights-dtype {weights_dtype!r}: expected one of {', '.join(WEIGHTS_DTYPES)}")
    return WEIGHTS_DTYPES[weights_dtype]


@torch.no_grad()
def round_weights(module: torch.nn.Module, weights_dtype: str) -> None:
    """Round `module`'s floating-point weights in place to what a bundle saved with `weights_dtype` stores, so that
    what is measured and calibrated before saving is the model a user loads."""
    dtype = check_weights_dtype(weights_dtype)
    named = list(module.named_parameters()) + list(module.named_buffers())
    # before rounding: a weight past the type's range would become inf, and every answer measured after it NaN
    beyond = _first_non_finite((name, t.to(dtype)) for name, t in named
                               if t.is_floating_point() and bool(torch.isfinite(t).all()))
    if beyond:
        raise DataError(f"--weights-dtype {weights_dtype}: the head's {beyond} holds values beyond that type's "
                        "range; save in float32")
    with torch.no_grad():
        for _, tensor in named:
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(dtype).to(tensor.dtype))


def save(model: VQAModel, path: str | Path, *, answers: AnswerVocab, tokenizer: Tokenizer,
         metrics: dict[str, Any] | None = None, max_len: int = 12, choice_len: int = 8,
         extra: dict[str, Any] | None = None, calibration: Calibration | None = None,
         ood: OutOfScopeDetector | None = None, reference_encoder: bool = False,
         weights_dtype: str = "float32", run_config: dict[str, Any] | None = None) -> Path:
    """Write `model` and its vocabularies (and its calibration) as a bundle folder, atomically; `run_config`: the
    recipe that made it (`vqa.training.shareable_config`), published with the rest.

    `reference_encoder`: a frozen encoder that `create_encoder(its name)` rebuilds exactly (weights from an
    installed package) is stored by name and fingerprint, not copied. `weights_dtype="float16"` halves the
    head's file, text tower included (it is read back into float32; measure the bundle on the saved copy, or
    `round_weights` first)."""
    from encoders import save_reference
    from heads import head_to_dict

    dtype = check_weights_dtype(weights_dtype)
    state = {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}
    _check_finite(model, state)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    beyond = _first_non_finite(state.items())
    if beyond:
        raise DataError(f"--weights-dtype {weights_dtype}: the head's {beyond} holds values beyond that type's "
                        "range; save in float32")
    with atomic_dir(path, overwrite=True) as tmp:
        if not (reference_encoder and model.encoder.frozen and save_reference(model.encoder, tmp / "encoder")):
            model.encoder.save_pretrained(tmp / "encoder")
        atomic_write_safetensors(tmp / "model.safetensors", state, metadata={"format": "pt", "dtype": weights_dtype})
        answers.save(tmp / "answers.json")
        if isinstance(tokenizer, WordVocab):
            tokenizer.save(tmp / "vocab.json")
            tokenizer_config = {"type": "words", "file": "vocab.json"}
        else:  # a pretrained text tower: its tokenizer files travel with the bundle
            tokenizer.tower.tokenizer.save_pretrained(str(tmp / TOKENIZER_FOLDER))
            tokenizer_config = {"type": "text-tower", "folder": TOKENIZER_FOLDER}
        config = {
            "medvqa_version": __version__,
            "encoder": {"folder": "encoder", "name": model.encoder.name, "image_features": model.image_features},
            "head": head_to_dict(model.head),
            "tokenizer": {**tokenizer_config, "max_len": max_len, "choice_len": choice_len},
            "answers": {"file": "answers.json", "protocol": answers.protocol, "size": len(answers)},
            **(extra or {}),
        }
        atomic_write_json(tmp / "config.json", config)
        atomic_write_json(tmp / "metrics.json", metrics or {})
        if calibration is not None:
            atomic_write_json(tmp / CALIBRATION_FILE, calibration.to_dict())
            if calibration.uses_trust:
                calibration.trust.save(tmp)
        if ood is not None:
            ood.save(tmp)
        if run_config is not None:
            atomic_write_json(tmp / "run_config.json", run_config)
    log.info("saved bundle %s", path)
    return Path(path)


def _first_non_finite(named) -> str | None:
    """The name of the first (name, tensor) pair holding a NaN or an infinity, or None."""
    return next((name for name, t in named if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)


def _check_finite(model: VQAModel, head_state: dict[str, torch.Tensor]) -> None:
    """A model with NaN or infinite weights is never saved: it would answer garbage with confidence."""
    named = [(f"head.{k}", v) for k, v in head_state.items()]
    named += [(f"encoder.{k}", v) for k, v in model.encoder.state_dict().items()]
    name = _first_non_finite(named)
    if name:
        raise DataError(f"refusing to save a bundle with non-finite weights ({name}): training diverged")


def load(path: str | Path, device: str | torch.device = "cpu") -> Bundle:
    """Rebuild the model from a bundle folder; every inconsistency is a DataError naming the file."""
    from encoders import load_encoder_folder
    from heads import head_from_dict

    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: bundle folder not found")
    for name in REQUIRED:
        if not (path / name).is_file():
            raise DataError(f"{path}: bundle is missing {name}")
    files = load_files(path)
    config, tokenizer, answers = files.config, files.tokenizer, files.answers
    # a text tower is its own tokenizer and the head's question encoder: it receives the weights below
    question_encoder = tokenizer if isinstance(tokenizer, torch.nn.Module) else None
    encoder = load_encoder_folder(path / "encoder")  # its errors name the encoder's own files
    try:
        head = head_from_dict(config["head"], question_encoder)
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path / 'config.json'}: cannot rebuild the model: the head it describes fails ({e})") from None
    try:
        state = load_file(str(path / "model.safetensors"))
    except (SafetensorError, OSError) as e:
        raise DataError(f"{path / 'model.safetensors'}: cannot rebuild the model: not a readable safetensors "
                        f"file ({e})") from None
    expected = head.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise DataError(f"{path / 'model.safetensors'}: weights do not match the head in config.json "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise DataError(f"{path / 'model.safetensors'}: tensor {key!r} has shape {tuple(state[key].shape)}, "
                            f"but config.json describes a head whose {key!r} is {tuple(tensor.shape)}")
    head.load_state_dict(state)
    _check_vocab(path, head, tokenizer, answers)
    model = VQAModel(encoder, head, config.get("encoder", {}).get("image_features", "grid")).to(device).eval()
    encoder.freeze()
    return Bundle(**vars(files), model=model)


def model_digest(path: str | Path) -> str:
    """A short digest of the network's weights and answers (not of its calibration, card or reports, which change
    with the model unchanged): what an eval report records, so that a report is matched to the model it scored."""
    digest = hashlib.sha256()
    for name in DIGESTED:
        digest.update(f"|{name}|".encode())
        hash_file(digest, Path(path) / name)
    return digest.hexdigest()[:16]


def load_files(path: str | Path) -> BundleFiles:
    """The bundle's files other than the network (config, vocabularies, metrics, calibration, out-of-scope
    detector): what `load` reads before rebuilding the model, and all an ONNX export needs besides its graphs."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: bundle folder not found")
    config = read_json(path / "config.json")
    if not isinstance(config, dict) or "head" not in config or "tokenizer" not in config:
        raise DataError(f"{path / 'config.json'}: not a medvqa bundle config (needs 'head' and 'tokenizer')")
    answers = AnswerVocab.load(path / "answers.json")
    tokenizer = _load_tokenizer(path, config)
    metrics = read_json(path / "metrics.json") if (path / "metrics.json").is_file() else {}
    calibration = None
    if (path / CALIBRATION_FILE).is_file():
        calibration = Calibration.from_dict(read_json(path / CALIBRATION_FILE), str(path / CALIBRATION_FILE),
                                            TrustScorer.load(path))
    return BundleFiles(answers, tokenizer, config, metrics, calibration, OutOfScopeDetector.load(path))


def _load_tokenizer(path: Path, config: dict[str, Any]) -> Tokenizer:
    """The word vocabulary, or the text tower (architecture; the weights are the head's) with its tokenizer."""
    kind = config["tokenizer"].get("type", "words")
    if kind == "words":
        if not (path / "vocab.json").is_file():
            raise DataError(f"{path}: bundle is missing vocab.json")
        return WordVocab.load(path / "vocab.json")
    if kind != "text-tower":
        raise DataError(f"{path / 'config.json'}: tokenizer type {kind!r} unknown; expected 'words' or 'text-tower'")
    from encoders.text import TextQuestionEncoder, load_tokenizer

    folder = path / config["tokenizer"].get("folder", TOKENIZER_FOLDER)
    hf_tokenizer = load_tokenizer(folder) if folder.is_dir() else None
    if hf_tokenizer is None:
        raise DataError(f"{path}: bundle is missing its question tokenizer ({folder.name}/tokenizer.json)")
    spec = config["head"].get("question_encoder", {})
    if spec.get("class") != TextQuestionEncoder.__name__:
        raise DataError(f"{path / 'config.json'}: question encoder {spec.get('class')!r} is not a text tower")
    return TextQuestionEncoder.from_config(spec["config"], hf_tokenizer)


def _check_vocab(path: Path, head: torch.nn.Module, words: Tokenizer, answers: AnswerVocab) -> None:
    """The vocabularies must have the sizes the weights were trained with."""
    vocab_size = getattr(getattr(head.question_encoder, "config", None), "vocab_size", None)
    if isinstance(words, WordVocab) and vocab_size is not None and vocab_size != len(words):
        raise DataError(f"{path / 'vocab.json'}: {len(words)} words, but the question encoder in "
                        f"model.safetensors has {vocab_size} embeddings")
    if head.num_answers != len(answers):
        raise DataError(f"{path / 'answers.json'}: {len(answers)} answers, but the weights in "
                        f"model.safetensors score {head.num_answers}")
