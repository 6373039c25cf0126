"""Gradient checkpointing of a fine-tuned image encoder: memory kept for the backward pass, peak RSS and step time,
without and with `set_grad_checkpointing` (`--grad-checkpointing`), side by side in one run.

    .venv/bin/python benchmarks/grad_checkpointing.py --threads 1                  # EfficientNet-Lite0, batch 32
    .venv/bin/python benchmarks/grad_checkpointing.py --encoder clip-vit-tiny --batch 64
    python benchmarks/grad_checkpointing.py --device cuda --encoder clip-vit-b32 --batch 128

Each setting runs in its own process (peak RSS is a process's high-water mark): a few training steps of the
encoder alone (forward, a loss on its grid and pooled features, backward, AdamW), BatchNorm statistics kept as
pretrained as `--encoder-norm frozen` does (checkpointing refuses to recompute training BatchNorm layers). On a
GPU the peak is torch's allocator's. The gradients of both settings are compared on the first batch.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import time

import torch


def one_setting(args: argparse.Namespace) -> dict:
    """Run the steps in this process; the measurements as a dict."""
    from encoders import create_encoder

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    encoder = create_encoder(args.encoder).to(device).train()
    if encoder.batch_norms:
        encoder.freeze_norm_()
    if args.checkpointing:
        encoder.set_grad_checkpointing()
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=1e-5)
    pixels = torch.randn(args.batch, encoder.in_chans, encoder.image_size, encoder.image_size, device=device)
    kept, times, first_grad = 0, [], None

    def pack(t):
        nonlocal kept
        kept += t.numel() * t.element_size()
        return t

    for step in range(args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if step == 0 else contextlib.nullcontext():
            out = encoder(pixels)
        loss = out["grid"].float().square().mean() + out["pooled"].float().square().mean()
        loss.backward()
        if step == 0:
            first_grad = torch.cat([p.grad.flatten() for p in encoder.parameters() if p.grad is not None])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"kept_mb": kept / 2**20, "peak_mb": peak / 2**20, "step_s": statistics.median(times[1:] or times),
            "grad_norm": float(first_grad.norm()), "grad_sum": float(first_grad.double().sum())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", default="efficientnet-lite0-imagenet")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=4, help="the first is a warm-up; the median of the rest is shown")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)  # one setting, in a child
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(one_setting(args)))
        return
    rows = {}
    for checkpointing in (False, True):
        argv = [sys.executable, __file__, "--child", "--encoder", args.encoder, "--batch", str(args.batch),
                "--steps", str(args.steps), "--threads", str(args.threads), "--device", args.device]
        done = subprocess.run(argv + (["--checkpointing"] if checkpointing else []), capture_output=True, text=True,
                              check=True)
        rows[checkpointing] = json.loads(done.stdout.strip().splitlines()[-1])
    plain, ckpt = rows[False], rows[True]
    print(f"{args.encoder}, batch {args.batch} at {args.device} ({args.threads} thread(s)), fine-tuning step:")
    print(f"{'':<24}{'kept for backward':>20}{'peak memory':>14}{'step':>10}")
    for name, r in (("plain", plain), ("grad checkpointing", ckpt)):
        print(f"{name:<24}{r['kept_mb']:>17.0f} MB{r['peak_mb']:>11.0f} MB{r['step_s']:>9.2f}s")
    print(f"{'ratio (checkpointing)':<24}{ckpt['kept_mb'] / plain['kept_mb']:>20.2f}"
          f"{ckpt['peak_mb'] / plain['peak_mb']:>14.2f}{ckpt['step_s'] / plain['step_s']:>10.2f}")
    same = abs(ckpt["grad_norm"] - plain["grad_norm"]) <= 1e-4 * plain["grad_norm"]
    print(f"first-batch gradient norm {plain['grad_norm']:.6g} vs {ckpt['grad_norm']:.6g}: "
          f"{'the same' if same else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
