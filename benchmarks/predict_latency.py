"""Answer latency of a bundle on CPU: per question after load, and from a cold process start.

    python benchmarks/predict_latency.py                       # the demo's embedded default model
    python benchmarks/predict_latency.py --bundle runs/x/bundle --questions 100 --threads 1 2

Warm: the median (and p90, max) time of `Predictor.predict(image_path, question)`
after load and 3 warm-up answers, each call decoding its image file, encoding it
and running the head (the demo's path), for each torch thread count asked for
(`medvqa demo` and `medvqa predict` use 1). Cold: a fresh Python process is
started and timed from spawn to the first answer printed (imports + bundle load +
first answer), repeated --cold-runs times, with the first thread count. Target
(TARGETS.md): < 300 ms per answer on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGET_MS = 300.0
_CHILD = """
import json, sys, time
t0 = time.perf_counter()
import torch
from vqa import Predictor
t1 = time.perf_counter()
p = Predictor.from_bundle(sys.argv[1])
t2 = time.perf_counter()
p.predict(sys.argv[2], sys.argv[3])
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_answer_s": t3 - t2}))
"""


def warm_latency(predictor, pairs: list[tuple[Path, str]], n: int) -> dict:
    for image, question in pairs[:3]:
        predictor.predict(image, question)
    times = []
    for i in range(n):
        image, question = pairs[i % len(pairs)]
        start = time.perf_counter()
        predictor.predict(image, question)
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return {"n": n, "median_ms": statistics.median(times), "p90_ms": times[int(0.9 * (n - 1))],
            "max_ms": times[-1], "mean_ms": statistics.fmean(times)}


def cold_start(bundle: Path, image: Path, question: str, runs: int, threads: int) -> dict:
    rows = []
    env = {**os.environ, "MEDVQA_LOG_LEVEL": "WARNING", "OMP_NUM_THREADS": str(threads)}
    for _ in range(runs):
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", _CHILD, str(bundle), str(image), question], check=True,
                             capture_output=True, text=True, env=env)
        total = time.perf_counter() - start
        rows.append({**json.loads(out.stdout.strip().splitlines()[-1]), "total_s": total})
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]} | {"runs": runs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default=None, help="bundle folder (default: the demo's embedded default model)")
    p.add_argument("--questions", type=int, default=50, help="timed answers after warm-up (default: 50)")
    p.add_argument("--cold-runs", type=int, default=3, help="fresh processes to time (default: 3)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                   help="torch intra-op thread counts to time (default: 1 2)")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = p.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import torch

    from demos.examples import QUESTIONS, ensure_examples

    torch.set_num_threads(args.threads[0])
    if args.bundle is None:
        from demos.default_model import ensure_default_bundle

        bundle = ensure_default_bundle(progress=True)
    else:
        bundle = Path(args.bundle)
    from vqa import Predictor

    examples = ensure_examples()
    pairs = [(e.path, q) for q in QUESTIONS for e in examples]
    predictor = Predictor.from_bundle(bundle)
    warm = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        warm[threads] = warm_latency(predictor, pairs, args.questions)
    cold = cold_start(bundle, pairs[0][0], pairs[0][1], args.cold_runs, args.threads[0])
    result = {"bundle": str(bundle), "cpus": os.cpu_count(), "warm": warm, "cold": cold, "target_ms": TARGET_MS,
              "cold_threads": args.threads[0]}
    print(f"bundle: {bundle}\nCPUs: {result['cpus']}; {len(pairs)} (image, question) pairs, cycled\n")
    print("| measure | value |\n|---|---|")
    for threads, w in warm.items():
        print(f"| answer latency after load, {threads} thread(s): median of {w['n']} | {w['median_ms']:.1f} ms |")
        print(f"| ... p90 / max | {w['p90_ms']:.1f} / {w['max_ms']:.1f} ms |")
    print(f"| cold start, {args.threads[0]} thread(s): process spawn to first answer (median of {cold['runs']}) "
          f"| {cold['total_s']:.2f} s |")
    print(f"| ... of which imports (torch, vqa) | {cold['import_s']:.2f} s |")
    print(f"| ... of which bundle load (incl. encoders/transformers import) | {cold['load_s']:.2f} s |")
    print(f"| ... of which first answer | {cold['first_answer_s'] * 1e3:.0f} ms |")
    best = min(w["median_ms"] for w in warm.values())
    verdict = "meets" if best < TARGET_MS else "MISSES"
    print(f"\nbest median {best:.1f} ms {verdict} the {TARGET_MS:.0f} ms target")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if best < TARGET_MS else 1


if __name__ == "__main__":
    sys.exit(main())
