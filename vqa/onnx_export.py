"""Export a bundle's network as ONNX graphs for onnxruntime (`medvqa export onnx BUNDLE OUT`).

    OUT/
      encoder.onnx   pixels (B, C, S, S) float32, normalised -> grid (B, N, D), pooled (B, D)
      ood_encoder.onnx  where the out-of-scope detector has an encoder of its own (vqa.ood): pixels at its size
                     -> pooled (B, D')
      head.onnx      grid, pooled, tokens (B, L), lengths (B,) [, choice_tokens (B, C, Lc), choice_lengths (B, C)]
                     -> logits (B, A | C), attention (B, N) [, type_logits (B, 2) when the head has a router]
                        [, fused (B, F) when the head exposes it (trust scores)]
      config.json    the bundle's config, plus "onnx": the graphs, their inputs and the preprocessing
      answers.json, vocab.json, metrics.json, calibration.json, ood.safetensors, trust.safetensors:
                     copied as they are (not the card: it names the bundle's folder, and the bundle has it)

The head graph is the `VQAModel` on features (its feature selection included; an input the
graph does not read, such as `grid` for `--image-features pooled`, is left out of it), so
onnxruntime computes what `vqa.inference.predict` asks PyTorch for. Batch (and choice) axes
are dynamic. Exported with the TorchScript exporter (`dynamo=False`): it needs nothing beyond
torch, and handles the packed GRU of the question encoder. After writing, both graphs are run
against PyTorch on sample inputs when onnxruntime is installed (`ExportReport.max_abs_diff`).
"""
from __future__ import annotations

import logging
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .bundle import TOKENIZER_FOLDER, Bundle, load
from .calibration import CALIBRATION_FILE
from .errors import DataError
from .io import atomic_dir, atomic_write_json
from .ood import OOD_FILE
from .trust import TRUST_FILE

log = logging.getLogger(__name__)

OPSET = 17
FORMAT, FORMAT_VERSION = "medvqa-onnx", 1
ENCODER_FILE, HEAD_FILE, OOD_ENCODER_FILE = "encoder.onnx", "head.onnx", "ood_encoder.onnx"
COPIED = ("answers.json", "vocab.json", "metrics.json", CALIBRATION_FILE, OOD_FILE, TRUST_FILE)
CHOICES = ("choice_tokens", "choice_lengths")


@dataclass
class ExportReport:
    folder: Path
    encoder_inputs: list[str]
    head_inputs: list[str]
    head_outputs: list[str]
    max_abs_diff: dict[str, float] = field(default_factory=dict)  # output -> |onnxruntime - torch| on samples


class _EncoderGraph(nn.Module):
    """pixels -> the encoder's stable outputs (grid and pooled, or pooled alone) as a tuple, for the exporter."""

    def __init__(self, encoder: nn.Module, outputs: tuple[str, ...] = ("grid", "pooled")) -> None:
        super().__init__()
        self.encoder, self.outputs = encoder, outputs

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.encoder(pixels)
        return tuple(features[k] for k in self.outputs)  # grid (B, N, D), pooled (B, D)


class _HeadGraph(nn.Module):
    """The VQAModel on features, its output dict as a tuple in `outputs` order."""

    def __init__(self, model: nn.Module, outputs: list[str]) -> None:
        super().__init__()
        self.model, self.outputs = model, outputs

    def forward(self, grid, pooled, tokens, lengths, *choices):
        out = self.model({"grid": grid, "pooled": pooled}, tokens, lengths, **dict(zip(CHOICES, choices)))
        return tuple(out[k] for k in self.outputs)


def sample_inputs(bundle: Bundle, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs of the shapes the Predictor feeds (random values, varied question lengths and choice counts)."""
    g = torch.Generator().manual_seed(seed)
    encoder, head = bundle.model.encoder, bundle.model.head
    side, words, max_len = encoder.image_size, bundle.tokenizer.vocab_size, bundle.max_len
    lengths = torch.tensor([max_len - i * max(1, max_len // batch) for i in range(batch)]).clamp(min=1)
    tokens = torch.randint(2, max(words, 3), (batch, max_len), generator=g)
    tokens[torch.arange(max_len)[None, :] >= lengths[:, None]] = 0  # right padding, as encode_queries pads
    out = {"pixels": torch.randn(batch, encoder.in_chans, side, side, generator=g), "tokens": tokens,
           "lengths": lengths}
    if head.needs_choices:
        n = 3
        choice_lengths = torch.randint(1, bundle.choice_len + 1, (batch, n), generator=g)
        choice_lengths[0, -1] = 0  # an absent choice, as when questions have different numbers of choices
        out["choice_tokens"] = torch.randint(2, max(words, 3), (batch, n, bundle.choice_len), generator=g)
        out["choice_lengths"] = choice_lengths
    return out


def export_onnx(bundle_path: str | Path, out: str | Path, *, overwrite: bool = False, opset: int = OPSET,
                verify: bool = True) -> ExportReport:
    """Write `out` (see the module docstring) from the bundle folder `bundle_path`."""
    source, target = Path(bundle_path).resolve(), Path(out).resolve()
    if source == target or source.is_relative_to(target):
        raise DataError(f"{out}: the export would replace the bundle it is made from; use BUNDLE/onnx or a new folder")
    bundle = load(bundle_path)
    model = bundle.model.eval()
    head = model.head
    outputs = ["logits", "attention"] + (["type_logits"] if head.has_type_router else []) + (
        ["fused"] if head.has_fused_output else [])  # fused: the calibration's trust scores read it
    sample = sample_inputs(bundle)
    with torch.no_grad():
        features = {k: v.float() for k, v in model.encoder(sample["pixels"]).items() if k in ("grid", "pooled")}
    head_args = (features["grid"], features["pooled"], sample["tokens"], sample["lengths"],
                 *[sample[k] for k in CHOICES if k in sample])
    head_names = ["grid", "pooled", "tokens", "lengths", *[k for k in CHOICES if k in sample]]
    batch = {0: "batch"}
    head_axes = {name: dict(batch) for name in head_names + outputs}
    if head.needs_choices:
        for name in (*CHOICES, "logits"):
            head_axes[name] = {0: "batch", 1: "choices"}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        _export(_EncoderGraph(model.encoder).eval(), (sample["pixels"],), tmp / ENCODER_FILE, ["pixels"],
                ["grid", "pooled"], {n: dict(batch) for n in ("pixels", "grid", "pooled")}, opset, "image encoder")
        _export(_HeadGraph(model, outputs).eval(), head_args, tmp / HEAD_FILE, head_names, outputs, head_axes, opset,
                "head")
        detector = _detector_encoder(bundle)
        if detector is not None:
            _export(_EncoderGraph(detector, ("pooled",)).eval(), (_pixels(detector),), tmp / OOD_ENCODER_FILE,
                    ["pixels"], ["pooled"], {n: dict(batch) for n in ("pixels", "pooled")}, opset,
                    "out-of-scope detector's encoder")
        encoder_inputs, head_inputs = _graph_inputs(tmp / ENCODER_FILE), _graph_inputs(tmp / HEAD_FILE)
        if detector is not None:
            _graph_inputs(tmp / OOD_ENCODER_FILE)
        atomic_write_json(tmp / "config.json", _config(bundle, head_inputs, outputs, opset))
        for name in COPIED:
            if (Path(bundle_path) / name).is_file():
                shutil.copy2(Path(bundle_path) / name, tmp / name)
        if (Path(bundle_path) / TOKENIZER_FOLDER).is_dir():  # a text tower's tokenizer files
            shutil.copytree(Path(bundle_path) / TOKENIZER_FOLDER, tmp / TOKENIZER_FOLDER)
        report = ExportReport(Path(out), encoder_inputs, head_inputs, outputs)
        if verify:
            report.max_abs_diff = _verify(tmp, model, sample, features, head_args, head_names, outputs, detector)
    log.info("exported %s to %s (max |onnxruntime - torch| %s)", bundle_path, out, report.max_abs_diff or "not checked")
    return report


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str], axes: dict,
            opset: int, what: str) -> None:
    try:
        with warnings.catch_warnings():
            # The exporter's notes on traced shape checks and on GRUs with varying batch sizes: the batch axis is
            # dynamic and the export is checked against PyTorch at another batch size (tests/test_onnx.py).
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs, dynamic_axes=axes,
                              opset_version=opset, dynamo=False)
    except Exception as e:  # the exporter's many failure types all mean "this architecture does not export"
        raise DataError(f"cannot export the {what} to ONNX: {type(e).__name__}: {str(e).splitlines()[0]}") from None


def _detector_encoder(bundle: Bundle) -> nn.Module | None:
    """The out-of-scope detector's own encoder (eval mode), or None where it reads the model's features."""
    ood = bundle.ood
    return None if ood is None or ood.reads_model_features else ood.own_encoder().eval()


def _pixels(encoder, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, encoder.in_chans, encoder.image_size, encoder.image_size,
                       generator=torch.Generator().manual_seed(seed))


def _encoder_spec(encoder, file: str) -> dict:
    """What the ONNX runtime needs to prepare an encoder graph's pixels, and what the graph gives."""
    return {"file": file, "name": encoder.name, "image_size": encoder.image_size, "in_chans": encoder.in_chans,
            "mean": list(encoder.mean), "std": list(encoder.std), "grid_size": list(encoder.grid_size),
            "feature_dim": encoder.feature_dim}


def _graph_inputs(path: Path) -> list[str]:
    """The graph's input names, after checking it is a valid ONNX model."""
    try:
        import onnx
    except ImportError:
        raise DataError("exporting to ONNX needs the onnx package: pip install 'medvqa[onnx]'") from None
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    return [i.name for i in graph.graph.input]


def _config(bundle: Bundle, head_inputs: list[str], outputs: list[str], opset: int) -> dict:
    head, detector = bundle.model.head, _detector_encoder(bundle)
    training = {"loss": bundle.loss, **bundle.config.get("training", {})}
    spec = {"format": FORMAT, "format_version": FORMAT_VERSION, "opset": opset, "torch": torch.__version__,
            "encoder": _encoder_spec(bundle.model.encoder, ENCODER_FILE),
            "head": {"file": HEAD_FILE, "name": head.name, "inputs": head_inputs, "outputs": outputs,
                     "has_type_router": head.has_type_router, "needs_choices": head.needs_choices,
                     "default_loss": head.default_loss}}
    if detector is not None:
        spec["ood_encoder"] = _encoder_spec(detector, OOD_ENCODER_FILE)
    return {**bundle.config, "training": training, "onnx": spec}


def _verify(folder: Path, model, sample: dict, features: dict, head_args: tuple, head_names: list[str],
            outputs: list[str], detector: nn.Module | None = None) -> dict[str, float]:
    """max |onnxruntime - torch| per output on the export's sample inputs (empty without onnxruntime)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        log.warning("onnxruntime is not installed: the export is not checked against PyTorch")
        return {}
    from .onnx_runtime import session

    diffs = {}
    with torch.no_grad():
        ref = dict(zip(outputs, _HeadGraph(model, outputs).eval()(*head_args)))
    got = session(folder / ENCODER_FILE).run(None, {"pixels": sample["pixels"].numpy()})
    for name, value in zip(("grid", "pooled"), got):
        diffs[name] = float((torch.from_numpy(value) - features[name]).abs().max())
    head_session = session(folder / HEAD_FILE)
    wanted = {i.name for i in head_session.get_inputs()}
    feed = {n: a.numpy() for n, a in zip(head_names, head_args) if n in wanted}
    for name, value in zip(outputs, head_session.run(outputs, feed)):
        diffs[name] = float((torch.from_numpy(value) - ref[name]).abs().max())
    if detector is not None:
        pixels = _pixels(detector)
        with torch.no_grad():
            expected = detector(pixels)["pooled"].float()
        got = session(folder / OOD_ENCODER_FILE).run(["pooled"], {"pixels": pixels.numpy()})[0]
        diffs["ood_pooled"] = float((torch.from_numpy(got) - expected).abs().max())
    return diffs
