"""Fine-tuning an image encoder on the CPU: a training step's forward and backward with NCHW (contiguous) against
channels-last weights and pixels, side by side in one run.

    .venv/bin/python benchmarks/finetune_layout.py --threads 1
    .venv/bin/python benchmarks/finetune_layout.py --encoders efficientnet-lite0-imagenet --batch-size 32 --steps 8

`medvqa pretrain` trains its image tower channels-last (`CLIPPretrainModel.channels_last_`: ~12% faster
ResNet-50 steps here); this measures whether `medvqa train --encoder-mode finetune` should too. The two layouts
alternate step by step on the same random batch, so a busy machine slows both alike; the first steps (oneDNN's
warm-up) are dropped.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from PIL import Image


def step_seconds(encoder: torch.nn.Module, pixels: torch.Tensor) -> float:
    """One forward and backward of `pixels` through `encoder` (a sum of its grid and pooled outputs as the loss)."""
    started = time.perf_counter()
    out = encoder(pixels)
    loss = out["grid"].float().mean() + out["pooled"].float().mean()
    loss.backward()
    encoder.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def compare(name: str, batch_size: int, steps: int, warmup: int = 2) -> dict:
    """Median step seconds of each layout for encoder `name` (fresh weights from one seed, training mode)."""
    from encoders import create_encoder

    torch.manual_seed(0)
    nchw = create_encoder(name).train()
    nhwc = create_encoder(name).train()
    nhwc.load_state_dict(nchw.state_dict())
    nhwc.to(memory_format=torch.channels_last)
    size = nchw.image_size
    # through the encoder's own preprocessing: its channels (MEVF's are grey) and side
    noise = np.random.default_rng(0).integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
    pixels = nchw.preprocess([Image.fromarray(a) for a in noise])
    pixels_last = pixels.contiguous(memory_format=torch.channels_last)
    times: dict[str, list[float]] = {"nchw": [], "channels_last": []}
    for i in range(warmup + steps):
        a, b = step_seconds(nchw, pixels), step_seconds(nhwc, pixels_last)
        if i >= warmup:
            times["nchw"].append(a)
            times["channels_last"].append(b)
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {"encoder": name, "size": size, **medians, "speedup": medians["nchw"] / medians["channels_last"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoders", default="efficientnet-lite0-imagenet,timm:resnet10t",
                   help="comma-separated encoder names (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=6, help="timed steps per layout, after 2 dropped (default: 6)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print("| encoder | px | NCHW step (s) | channels-last step (s) | channels-last speedup |\n|---|---|---|---|---|")
    for name in args.encoders.split(","):
        r = compare(name.strip(), args.batch_size, args.steps)
        print(f"| {r['encoder']} | {r['size']} | {r['nchw']:.3f} | {r['channels_last']:.3f} | {r['speedup']:.2f}x |",
              flush=True)


if __name__ == "__main__":
    main()
