"""CPU fine-tuning steps with glibc's default heap against `keep_freed_memory`, side by side.

    .venv/bin/python benchmarks/heap_reuse.py                    # timm:resnet10t at 128 px, batch 32, 1 thread
    .venv/bin/python benchmarks/heap_reuse.py --encoder clip-vit-tiny --steps 20

Each setting runs in a fresh process (the allocator's state is per process), alternating default and reuse
`--repeats` times, on one thread: forward, backward and an Adam step of an image encoder with a linear
classifier on random images. Printed per setting: median ms per step, the kernel's share of the CPU time,
minor page faults per step and peak RSS, and the speed-up of reuse over the default.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def child(encoder: str, image_size: int, batch: int, steps: int, reuse: bool) -> dict:
    """Time `steps` training steps in this process; returns its measurements."""
    import torch

    from encoders import create_encoder
    from vqa.training.runtime import keep_freed_memory

    applied = keep_freed_memory() if reuse else False
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_encoder(encoder, image_size=image_size)
    classifier = torch.nn.Linear(model.feature_dim, 10)
    params = list(model.parameters()) + list(classifier.parameters())
    optimizer = torch.optim.Adam(params, lr=1e-4)
    x = torch.randn(batch, model.in_chans, image_size, image_size)
    y = torch.randint(0, 10, (batch,))

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(classifier(model(x)["pooled"]), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()  # the first step allocates everything once in both settings
    before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    after = resource.getrusage(resource.RUSAGE_SELF)
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    return {"reuse": applied, "ms_per_step": 1000 * statistics.median(times),
            "wall_s": time.perf_counter() - started, "kernel_share": system / max(user + system, 1e-9),
            "faults_per_step": (after.ru_minflt - before.ru_minflt) / steps, "peak_rss_mb": after.ru_maxrss / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", default="timm:resnet10t")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2, help="fresh processes per setting, alternating")
    p.add_argument("--child", choices=("default", "reuse"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.encoder, args.image_size, args.batch_size, args.steps, args.child == "reuse")))
        return
    results: dict[str, list[dict]] = {"default": [], "reuse": []}
    for _ in range(args.repeats):
        for setting in results:
            cmd = [sys.executable, __file__, "--child", setting, "--encoder", args.encoder, "--image-size",
                   str(args.image_size), "--batch-size", str(args.batch_size), "--steps", str(args.steps)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[setting].append(json.loads(out.strip().splitlines()[-1]))
    if not all(r["reuse"] for r in results["reuse"]):
        print("keep_freed_memory had no effect here (not glibc): both rows are the default heap")
    ms = {s: statistics.median(r["ms_per_step"] for r in rs) for s, rs in results.items()}
    print(f"{args.encoder}, {args.image_size} px, batch {args.batch_size}, one thread, {args.steps} steps, "
          f"{args.repeats} processes per setting")
    print("| heap | ms/step | kernel share of CPU | minor faults/step | peak RSS (MB) |")
    print("|---|---|---|---|---|")
    for setting, rs in results.items():
        print(f"| {setting} | {ms[setting]:.0f} | {100 * statistics.median(r['kernel_share'] for r in rs):.0f}% | "
              f"{statistics.median(r['faults_per_step'] for r in rs):,.0f} | "
              f"{max(r['peak_rss_mb'] for r in rs):.0f} |")
    print(f"reuse speed-up: {ms['default'] / ms['reuse']:.2f}x")


if __name__ == "__main__":
    main()
