"""Retrieval (image->text and text->image R@1/5/10) and zero-shot classification of a CLIP model.

    python -m pretrain.evaluate --model runs/pretrain/clip --data runs/phantom/captions --split validate
    python -m pretrain.evaluate ... --shuffle-captions      # control: pairs broken at random -> chance level

Protocol, stated with every number:
- retrieval over the pairs of one held-out split, each image against every
  caption of the split; the rank of the paired item counts the items scoring
  strictly higher, so a caption repeated word for word (the phantom repeats
  captions of normal studies) ties with its copies instead of being ranked
  below them at random; chance R@K is K / N;
- zero-shot: each class is the mean embedding of its prompts (templates x class
  names, `pretrain/phantom_prompts.json` by default), an image takes the nearest
  class; the majority-class accuracy is given beside it.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from vqa.errors import DataError
from vqa.precision import check_precision, get_autocast, resolve_device

from .data import CaptionPair, load_captions, shuffle_captions
from .images import ImageTable, normalize

log = logging.getLogger(__name__)
KS = (1, 5, 10)


@torch.no_grad()
def embed_images(model, table: ImageTable, device: torch.device, precision: str = "fp32",
                 batch_size: int = 128) -> Tensor:
    """L2-normalised image embeddings (N, E), float32, on the CPU."""
    model.eval()
    out = []
    for start in range(0, len(table), batch_size):
        pixels = normalize(table.pixels[start:start + batch_size], model.image_encoder, device)
        with get_autocast(precision, device):
            out.append(model.encode_image(pixels).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def embed_texts(model, texts: Sequence[str], device: torch.device, precision: str = "fp32",
                batch_size: int = 256) -> Tensor:
    model.eval()
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = {k: v.to(device) for k, v in model.text.tokenize(texts[start:start + batch_size]).items()}
        with get_autocast(precision, device):
            out.append(model.encode_text(tokens["input_ids"], tokens["attention_mask"]).float().cpu())
    return torch.cat(out)


def retrieval_metrics(image_embeds: Tensor, text_embeds: Tensor, ks: Sequence[int] = KS) -> dict[str, float]:
    """Pair i is (image i, text i). Returns i2t_r@K, t2i_r@K (in %), their mean, and n."""
    sims = image_embeds.float() @ text_embeds.float().t()  # (N, N)
    positive = sims.diagonal()
    i2t_rank = (sims > positive[:, None]).sum(1)  # captions above the right one, per image
    t2i_rank = (sims > positive[None, :]).sum(0)  # images above the right one, per caption
    out: dict[str, float] = {}
    for k in ks:
        out[f"i2t_r{k}"] = 100.0 * float((i2t_rank < k).float().mean())
        out[f"t2i_r{k}"] = 100.0 * float((t2i_rank < k).float().mean())
    out["mean_recall"] = sum(v for key, v in out.items() if key[4] == "r") / (2 * len(ks))
    out["n"] = int(len(positive))
    return out


def load_prompts(path: str | Path | None = None) -> dict:
    """Zero-shot prompt sets: {field: {"templates": [...], "names": {class: [...]}}}."""
    from vqa.io import read_json

    data = read_json(Path(__file__).parent / "phantom_prompts.json" if path is None else path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object {{field: {{templates, names}}}}")
    return {k: v for k, v in data.items() if not k.startswith("_")}


def class_prompts(field_prompts: dict, value: str) -> list[str]:
    names = field_prompts.get("names", {}).get(value, [value])
    return [t.format(n) for t in field_prompts.get("templates", ["{}"]) for n in names]


@torch.no_grad()
def zero_shot(model, image_embeds: Tensor, pairs: Sequence[CaptionPair], prompts: dict, device: torch.device,
              precision: str = "fp32") -> dict[str, dict]:
    """Accuracy per label field present in every pair with at least two classes."""
    results = {}
    for field, spec in prompts.items():
        if not pairs or any(field not in p.labels for p in pairs):
            continue
        truth = [p.labels[field] for p in pairs]
        classes = sorted(set(truth))  # the split's own classes; prompts only name them
        if len(classes) < 2:
            continue
        class_embeds = []
        for value in classes:
            e = embed_texts(model, class_prompts(spec, value), device, precision).mean(0)
            class_embeds.append(e / e.norm())
        pred = (image_embeds @ torch.stack(class_embeds).t()).argmax(1)  # (N,)
        correct = [classes[int(i)] == t for i, t in zip(pred, truth)]
        majority = max(truth.count(c) for c in set(truth)) / len(truth)
        results[field] = {"accuracy": 100.0 * sum(correct) / len(correct), "majority": 100.0 * majority,
                          "classes": classes, "n": len(truth)}
    return results


def evaluate(model, pairs: Sequence[CaptionPair], table: ImageTable, device: torch.device, precision: str = "fp32",
             prompts: dict | None = None) -> dict:
    """{"retrieval": {...}, "zero_shot": {field: {...}}} on one split."""
    images = embed_images(model, table, device, precision)
    texts = embed_texts(model, [p.caption for p in pairs], device, precision)
    prompts = load_prompts() if prompts is None else prompts
    return {"retrieval": retrieval_metrics(images, texts),
            "zero_shot": zero_shot(model, images, pairs, prompts, device, precision)}


def summary_line(metrics: dict) -> str:
    r = metrics["retrieval"]
    zs = ", ".join(f"{k} {v['accuracy']:.1f}" for k, v in metrics.get("zero_shot", {}).items())
    return (f"i2t R@1/5/10 {r['i2t_r1']:.1f}/{r['i2t_r5']:.1f}/{r['i2t_r10']:.1f}, "
            f"t2i {r['t2i_r1']:.1f}/{r['t2i_r5']:.1f}/{r['t2i_r10']:.1f}" + (f"; zero-shot {zs}" if zs else ""))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pretrain.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="OUT/clip of `medvqa pretrain`, a CLIP folder or hub id")
    p.add_argument("--data", default="runs/phantom/captions")
    p.add_argument("--format", default="auto")
    p.add_argument("--split", default="validate")
    p.add_argument("--image-column", default="image")
    p.add_argument("--caption-column", default="caption")
    p.add_argument("--prompts", default=None, help="zero-shot prompt JSON (default: the phantom's)")
    p.add_argument("--shuffle-captions", action="store_true", help="control: pair captions with random images")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the metrics JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    from .model import load_clip_model

    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    check_precision(args.precision, device)
    pairs = load_captions(args.data, args.split, args.format, image_column=args.image_column,
                          caption_column=args.caption_column)
    if args.shuffle_captions:
        pairs = shuffle_captions(pairs, args.seed)
    model = load_clip_model(args.model).to(device)
    table = ImageTable([p.image for p in pairs], model.image_encoder.image_size, model.image_encoder.in_chans)
    metrics = evaluate(model, pairs, table, device, args.precision, load_prompts(args.prompts))
    metrics["protocol"] = {"split": args.split, "shuffled_captions": args.shuffle_captions}
    text = json.dumps(metrics, indent=2)
    if args.out:
        from vqa.io import atomic_write_text

        atomic_write_text(args.out, text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
