"""Images/s of one CLIP pretraining step (forward, loss, backward, AdamW), per precision, side by side.

    python benchmarks/pretrain_throughput.py                      # ViT-B/32 CLIP, 224 px, batch 32, 77 tokens
    python benchmarks/pretrain_throughput.py --model rn50
    python benchmarks/pretrain_throughput.py --model tiny --steps 5   # a quick check
    python benchmarks/pretrain_throughput.py --model vit-b16 --batch 256 --device cuda --precisions bf16
    python benchmarks/pretrain_throughput.py --model vit-b16 --batch 256 --device cuda --precisions bf16 --compile

Our step is `vqa.training.Trainer.train_step` over `pretrain.ContrastiveTask` (the code
`medvqa pretrain` runs: normalisation, forward, loss, backward, clipping, AdamW) on a model
built like open_clip's: the image tower from `encoders` and a CLIP text transformer
of the same size (width 512, 12 layers, vocabulary 49,408). When `open_clip` is
importable, its model of the same name is timed in the same run, in the same way
(random init, its ClipLoss, AdamW, torch.autocast), interleaved with ours so that
machine load affects both alike. Precisions: fp32 and bf16 (+ fp16 with a GPU).
Inputs are random pixels and random tokens; timings, not accuracy. The timed steps run back
to back with one synchronisation at each end, as training runs them (the engine reads the
step values back every `--sync-every` steps, not each step), so a GPU's time per step
is its steady state, with the host free to queue the next step while this one runs.
`--compile` times ours under torch.compile (FLOPs are still counted on the eager step).

Model FLOPs utilisation (MFU): the FLOPs of one training step are counted, not
estimated: torch's FlopCounterMode records every matmul, convolution and attention
of the forward and the backward of one real step (optimizer arithmetic is not model
FLOPs). MFU = those FLOPs x steps/s / the device's dense bf16 peak (a table of
NVIDIA parts below, or --peak-tflops); for fp32 rows it is still against the bf16
peak, so it shows what bf16 buys.
"""
from __future__ import annotations

import argparse
import time

import torch

MODELS = {
    # ours: (encoder, encoder overrides, text tower, embed dim); open_clip name
    "vit-b32": ("clip-vit-b32", {}, "clip-text-b", 512, "ViT-B-32"),
    "vit-b16": ("clip-vit-b16", {}, "clip-text-b", 512, "ViT-B-16"),
    "rn50": ("clip-rn50", {"embed_dim": 1024}, "clip-text-b", 1024, "RN50"),
    "tiny": ("clip-vit-tiny", {}, "clip-text-tiny", 32, None),
}
VOCAB, CONTEXT = 49_408, 77
# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's data sheets; the first name found in
# torch.cuda.get_device_name() wins, so the more specific spellings come first.
BF16_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("H800", 989.4), ("GH200", 989.4),
                    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.1), ("L4", 121.0), ("A10", 125.0))


def bf16_peak_tflops(device: torch.device) -> float | None:
    """The device's dense bf16 peak from BF16_PEAK_TFLOPS, or None (a CPU, an unlisted GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for part, peak in BF16_PEAK_TFLOPS if part in name), None)


def step_flops(step) -> float:
    """The model FLOPs of one call of `step` (forward + backward), counted as it runs."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


def _tokens(batch: int, generator: torch.Generator) -> torch.Tensor:
    ids = torch.randint(5, VOCAB - 1, (batch, CONTEXT), generator=generator)
    ids[:, 0], ids[:, -1] = 2, 3  # our BOS/EOS ids (the CLIP text tower pools at the first EOS)
    return ids


def build_ours(model: str, device: torch.device):
    from encoders import create_encoder
    from pretrain.model import CLIPPretrainModel, ContrastiveConfig
    from encoders.text import create_text_tower

    enc_name, enc_args, text_name, embed, _ = MODELS[model]
    text = create_text_tower(text_name, vocab_size=VOCAB)
    model = CLIPPretrainModel(create_encoder(enc_name, **enc_args), text, ContrastiveConfig(embed))
    return model.to(device).channels_last_()  # as `medvqa pretrain` does


def step_ours(model, precision: str, device: torch.device, batch: int, compile: bool = False):
    from pretrain import PretrainConfig
    from pretrain.task import ContrastiveTask, Micro, Split
    from vqa.training import Runtime, Trainer, World
    from vqa.training.schedule import Shard

    cfg = PretrainConfig(batch_size=batch, lr=1e-5, clip_norm=None, precision=precision, progress=False,
                         compile=compile)
    g = torch.Generator().manual_seed(0)
    enc = model.image_encoder
    pixels = torch.randint(0, 256, (batch, enc.in_chans, enc.image_size, enc.image_size), generator=g,
                           dtype=torch.uint8)
    ids = _tokens(batch, g)
    text = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    task = ContrastiveTask(cfg, model, Split([None] * batch, None, text), None, device, World())
    trainer = Trainer(task, cfg, Runtime(device, World()))
    item = [Micro(Shard(torch.arange(batch)), pixels, 0, 0, 0)]
    model.train()

    def step():
        trainer.train_step(item, "benchmark")
    return step


def step_open_clip(name: str, precision: str, device: torch.device, batch: int):
    import open_clip

    from vqa.training import get_autocast, make_grad_scaler

    model = open_clip.create_model(name, pretrained=None).to(device).train()
    loss_fn = open_clip.ClipLoss()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    scaler = make_grad_scaler(precision, device)
    g = torch.Generator().manual_seed(0)
    size = model.visual.image_size
    side = size[0] if isinstance(size, (tuple, list)) else size
    pixels = torch.randn(batch, 3, side, side, generator=g).to(device)
    ids = torch.randint(1, VOCAB - 1, (batch, CONTEXT), generator=g)
    ids[:, -1] = VOCAB - 1  # open_clip pools at the argmax token (its end-of-text id is the largest)
    ids = ids.to(device)

    def step():  # open_clip_train's step: autocast forward, (scaled) backward, optimizer step
        with get_autocast(precision, device):
            out = model(pixels, ids)
            if isinstance(out, dict):
                out = (out["image_features"], out["text_features"], out["logit_scale"])
            loss = loss_fn(*out[:3])
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def time_step(step, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per step of `steps` steps run back to back, after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit-b32", choices=sorted(MODELS))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="timed steps per measurement, back to back")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--precisions", default=None, help="comma list (default: fp32,bf16 [+fp16 on a GPU])")
    p.add_argument("--no-open-clip", action="store_true", help="time ours only")
    p.add_argument("--compile", action="store_true", help="time ours under torch.compile")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's dense bf16 peak for MFU (default: from the GPU's name; none on a CPU)")
    args = p.parse_args(argv)

    from vqa.training import resolve_device

    device = resolve_device(args.device)
    precisions = (args.precisions.split(",") if args.precisions
                  else ["fp32", "bf16"] + (["fp16"] if device.type == "cuda" else []))
    oc_name = MODELS[args.model][4]
    have_oc = False
    if oc_name and not args.no_open_clip:
        try:
            import open_clip  # noqa: F401
            have_oc = True
        except ImportError:
            print("open_clip is not installed: timing ours only (pip install open_clip_torch to compare)")
    torch.manual_seed(0)
    ours = build_ours(args.model, device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    peak = args.peak_tflops or bf16_peak_tflops(device)
    print(f"{args.model}: batch {args.batch}, {CONTEXT} tokens, {where}, {args.steps} steps back to back"
          + (", ours compiled" if args.compile else "") + "; "
          + (f"MFU against a dense bf16 peak of {peak:g} TFLOP/s" if peak else "no bf16 peak known: MFU not shown"))
    rows = []
    for precision in precisions:
        step = step_ours(ours, precision, device, args.batch)
        flops = step_flops(step)  # eager, what the model computes; also the first warm-up step
        if args.compile:
            step = step_ours(ours, precision, device, args.batch, compile=True)
        t_ours = time_step(step, args.steps, args.warmup, device)
        t_oc = None
        if have_oc:
            t_oc = time_step(step_open_clip(oc_name, precision, device, args.batch), args.steps, args.warmup, device)
        rows.append((precision, args.batch / t_ours, args.batch / t_oc if t_oc else None, flops / t_ours))
    base = {"ours": rows[0][1], "oc": rows[0][2]}
    vs = "vs " + rows[0][0]
    print(f"model FLOPs (forward + backward, counted in one step): {flops / args.batch:.3g} per image")
    print(f"{'precision':>9} | {'ours img/s':>10} | {vs:>8} | {'TFLOP/s':>7} | {'MFU':>5} | {'open_clip':>9} | {vs:>8} | "
          f"{'ours/open_clip':>14}")
    for precision, ours_ips, oc_ips, flops_per_s in rows:
        oc = f"{oc_ips:9.1f} | {oc_ips / base['oc']:7.2f}x | {ours_ips / oc_ips:13.2f}x" if oc_ips else \
            f"{'-':>9} | {'-':>8} | {'-':>14}"
        mfu = f"{flops_per_s / (peak * 1e12):5.1%}" if peak else f"{'-':>5}"
        print(f"{precision:>9} | {ours_ips:10.1f} | {ours_ips / base['ours']:7.2f}x | {flops_per_s / 1e12:7.2f} | "
              f"{mfu} | {oc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
