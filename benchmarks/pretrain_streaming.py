"""Peak memory and images/s of CLIP pretraining from the RAM table (`--data`) and from streamed shards
(`--train-data`), side by side in one run, on generated corpora of tiny images.

    PYTHONPATH=. python benchmarks/pretrain_streaming.py          # 2,000 and 20,000 images, 64 px, one thread
    PYTHONPATH=. python benchmarks/pretrain_streaming.py --sizes 10000 100000   # memory against corpus size
    PYTHONPATH=. python benchmarks/pretrain_streaming.py --sizes 10000 --workers 0 1 2   # worker scaling

For each corpus size: N deterministic 64 px JPEGs (shapes on noise) with captions naming
them are written as a JSON-lines caption file and, with `medvqa shards`' writer, as tar
shards of 1,000. Then one epoch of `pretrain()` runs in a fresh process per mode (so each
peak RSS is its own): `table` decodes every image into the uint8 table first, `stream`
reads the shards; each once per `--workers` count (DataLoader worker processes). Same tiny
encoder, text tower, batch and seed. Reported: peak RSS of the process, training images/s
(the epoch's own rate), the share of the epoch spent waiting for batches (decoding, in
the process itself without workers) and wall seconds including decoding.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES, COLOURS = ("disc", "square", "bar"), ("bright", "dark")


def make_corpus(root: Path, n: int, side: int = 64) -> Path:
    """N JPEGs + captions/train.jsonl under root; deterministic."""
    import numpy as np
    from PIL import Image, ImageDraw

    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        noise = rng.integers(0, 80, (side, side), dtype=np.uint8)
        img = Image.fromarray(noise, "L")
        shape, colour = SHAPES[i % 3], COLOURS[(i // 3) % 2]
        x, y = (int(v) for v in rng.integers(12, side - 12, 2))
        r = int(rng.integers(4, 10))
        fill = 250 if colour == "bright" else 140
        draw = ImageDraw.Draw(img)
        box = (x - r, y - r, x + r, y + r)
        if shape == "disc":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.rectangle((x - r, y - 2, x + r, y + 2), fill=fill)
        name = f"images/{i:06d}.jpg"
        img.save(root / name, quality=90)
        side_word = "left" if x < side // 2 else "right"
        rows.append({"image": name, "caption": f"a {colour} {shape} on the {side_word}", "id": str(i)})
    with open(root / "train.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return root / "train.jsonl"


def child(mode: str, data: str, shards: str, out: str, workers: int, threads: int) -> None:
    """One epoch of pretraining in this process; prints a JSON line with its peak RSS and speed."""
    from pretrain import PretrainConfig, pretrain

    cfg = dict(data=data, out=out, epochs=1, batch_size=64, lr=1e-3, warmup_epochs=0.1, progress=False,
               val_split="none", embed_dim=32, text="bert-tiny", threads=threads, workers=workers, seed=0,
               encoder="timm:resnet10t",
               encoder_args={"image_size": 64, "model_kwargs": {"channels": [8, 16, 32, 64], "stem_width": 8}})
    if mode == "stream":
        cfg["train_data"] = shards
    else:
        cfg["image_cache"] = "ram"
    start = time.perf_counter()
    history = pretrain(PretrainConfig(**cfg))["history"]
    wall = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    children_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest worker
    print(json.dumps({"mode": mode, "peak_rss_mb": round(peak_mb, 1), "worker_peak_rss_mb": round(children_mb, 1),
                      "images_per_s": round(history[0]["samples_per_s"], 1), "wall_s": round(wall, 1),
                      "input_wait": round(history[0]["input_wait_share"], 3),
                      "loss": round(history[0]["loss"], 4)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000], help="corpus sizes (images)")
    p.add_argument("--workers", type=int, nargs="+", default=[0],
                   help="DataLoader worker counts, each run in both modes (default: 0)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default: 1)")
    p.add_argument("--child", nargs=5, metavar=("MODE", "DATA", "SHARDS", "OUT", "N"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        mode, data, shards, out, _ = args.child
        child(mode, data, shards, out, args.workers[0], args.threads)
        return
    from pretrain.data import load_captions
    from pretrain.shards import write_shards

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "MEDVQA_LOG_LEVEL": "WARNING"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            root = Path(tmp) / f"n{n}"
            started = time.perf_counter()
            data = make_corpus(root, n)
            manifest = write_shards(load_captions(data, "train"), root / "shards", shard_size=1000, workers=2,
                                    progress=False)
            print(f"{n} images: corpus and {manifest['total']['shards']} shards "
                  f"({manifest['total']['bytes'] / 2**20:.1f} MB) in {time.perf_counter() - started:.0f} s",
                  flush=True)
            for workers in args.workers:
                for mode in ("table", "stream"):
                    cmd = [sys.executable, __file__, "--workers", str(workers), "--threads", str(args.threads),
                           "--child", mode, str(data), str(root / "shards"), str(root / f"run-{mode}-{workers}"),
                           str(n)]
                    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
                    if done.returncode:
                        sys.exit(f"{mode} with {workers} workers on {n} images failed:\n{done.stderr[-3000:]}")
                    row = {"images": n, "workers": workers, **json.loads(done.stdout.strip().splitlines()[-1])}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    # RUSAGE_CHILDREN is the largest DataLoader worker, where there are some
    print("\n| images | mode | workers | peak RSS (MB) | largest worker RSS (MB) | train images/s | "
          "vs table, same workers | waiting for input | wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    table = {(r["images"], r["workers"]): r["images_per_s"] for r in rows if r["mode"] == "table"}
    for r in rows:
        print(f"| {r['images']:,} | {r['mode']} | {r['workers']} | {r['peak_rss_mb']:.0f} | "
              + (f"{r['worker_peak_rss_mb']:.0f}" if r["workers"] else "–")
              + f" | {r['images_per_s']:.0f} | {r['images_per_s'] / table[r['images'], r['workers']]:.2f}x | "
              f"{r['input_wait']:.0%} | {r['wall_s']:.1f} |")


if __name__ == "__main__":
    main()
