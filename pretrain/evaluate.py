"""Retrieval (image->text and text->image R@1/5/10) and zero-shot classification of a CLIP model.

    medvqa pretrain-eval --model runs/pretrain/clip --data runs/phantom/captions --split validate
    medvqa pretrain-eval ... --shuffle-captions      # control: pairs broken at random -> chance level

Protocol, stated with every number:
- retrieval over the pairs of one held-out split, each image (once, however
  many captions it has) against every caption of the split; the rank of the
  paired item counts the items scoring higher, and ties are broken at random,
  in expectation, except with a word-for-word copy of the image's own caption
  (the phantom repeats captions of normal studies), which is no miss; chance
  R@K is K / N;
- zero-shot: each class is the mean embedding of its prompts (templates x class
  names, `pretrain/phantom_prompts.json` by default, any file with `--prompts`), an
  image takes the nearest class; the majority-class accuracy is given beside it. A
  label field is scored only when the prompt file names every class the split has:
  prompts written for other data would score meaningless numbers (a warning says
  which fields were skipped and why).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from torch import Tensor

from encoders import ImageTable, normalize
from vqa.errors import DataError
from vqa.training import get_autocast

from .data import CaptionPair

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


def retrieval_metrics(image_embeds: Tensor, text_embeds: Tensor, ks: Sequence[int] = KS,
                      images: Sequence | None = None, captions: Sequence[str] | None = None) -> dict[str, float]:
    """Pair i is (image i, text i). Returns i2t_r@K, t2i_r@K (in %), their mean, and n (pairs). `images`: each
    pair's image (a path): the pairs of one image share its captions, any of them right for it (and it for each of
    them), and it is ranked once, as COCO-style retrieval counts an image with several captions. `captions`: each
    pair's text, so that a word-for-word copy of an image's own caption ties with it instead of counting half."""
    sims = image_embeds.float() @ text_embeds.float().t()  # (N, N)
    n = len(sims)
    group = _groups(images, n)
    same = _same(group)  # (N, N): pair i's image is pair j's
    firsts: dict[int, int] = {}  # each image's first pair: its row, ranked once
    for i, g in enumerate(group.tolist()):
        firsts.setdefault(g, i)
    first = torch.tensor(list(firsts.values()), dtype=torch.long)
    copies = torch.eye(n, dtype=torch.bool) if captions is None else _same(_groups(captions, n))
    own_words = (same.float() @ copies.float()) > 0  # (N, N): caption j repeats a caption of pair i's image
    other = ~same
    # per image: captions of other images above its best own caption; per caption: other images above its own.
    # Ties are broken at random, in expectation: a hit at K is the chance of landing among the first K (a collapsed
    # tower scores chance, K / N, not 100 %)
    best = sims.masked_fill(other, float("-inf")).max(1).values[:, None]
    i2t = (((sims > best) & other).sum(1)[first], ((sims == best) & other & ~own_words).sum(1)[first])
    rows, own = sims[first], sims.diagonal()[None, :]
    t2i = (((rows > own) & other[first]).sum(0), ((rows == own) & other[first]).sum(0))
    out: dict[str, float] = {}
    for k in ks:
        for name, (above, tied) in (("i2t", i2t), ("t2i", t2i)):
            out[f"{name}_r{k}"] = 100.0 * float(((k - above) / (tied + 1)).clamp(0, 1).mean())
    out["mean_recall"] = sum(v for key, v in out.items() if key[4] == "r") / (2 * len(ks))
    out["n"] = n
    return out


def _groups(keys: Sequence | None, n: int) -> Tensor:
    """(N,) the index of each item's key among the distinct keys (every item its own without keys). An in-memory
    image is known by its pixels: a `datasets` source opens a new object for each row of one picture."""
    from encoders.cache import image_hash

    keys = list(range(n)) if keys is None else [image_hash(k) if isinstance(k, Image.Image) else str(k) for k in keys]
    index = {k: j for j, k in enumerate(dict.fromkeys(keys))}
    return torch.tensor([index[k] for k in keys])


def _same(group: Tensor) -> Tensor:
    return group[:, None] == group[None, :]


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
    """Accuracy per label field present in every pair, with at least two classes, all named by `prompts`."""
    results = {}
    for field, spec in prompts.items():
        if not pairs or any(field not in p.labels for p in pairs):
            continue
        truth = [p.labels[field] for p in pairs]
        classes = sorted(set(truth))  # the split's own classes; prompts only name them
        if len(classes) < 2:
            continue
        unnamed = [c for c in classes if c not in spec.get("names", {})]
        if unnamed:
            log.warning("zero-shot %r skipped: the prompts do not name its classes %s (%d of %d unnamed); pass "
                        "--prompts with names for this data's classes", field, unnamed[:5], len(unnamed), len(classes))
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
    return {"retrieval": retrieval_metrics(images, texts, images=[p.image for p in pairs],
                                           captions=[p.caption for p in pairs]),
            "zero_shot": zero_shot(model, images, pairs, prompts, device, precision)}


def summary_line(metrics: dict) -> str:
    r = metrics["retrieval"]
    zs = ", ".join(f"{k} {v['accuracy']:.1f}" for k, v in metrics.get("zero_shot", {}).items())
    return (f"i2t R@1/5/10 {r['i2t_r1']:.1f}/{r['i2t_r5']:.1f}/{r['i2t_r10']:.1f}, "
            f"t2i {r['t2i_r1']:.1f}/{r['t2i_r5']:.1f}/{r['t2i_r10']:.1f}" + (f"; zero-shot {zs}" if zs else ""))
