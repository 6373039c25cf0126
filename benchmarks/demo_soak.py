"""Soak test of the Gradio demo: many mixed requests to 127.0.0.1, crashes, memory and latency.

    .venv/bin/python benchmarks/demo_soak.py                      # 1,000 requests, a small phantom bundle
    .venv/bin/python benchmarks/demo_soak.py --bundle runs/demo/bundle --requests 300

The server is `medvqa demo` in its own process (as a user runs it, --threads 1); the
client is `gradio_client` on the `/ask` endpoint. The mix repeats, in order: valid
requests (4 in 10), an empty question, a 10,000-character question, a file that is not an
image, a huge image (a 12,000 x 12,000 JPEG), a PNG whose header claims 20,000 x 20,000
pixels, and no image. A request that the server answers with an error in the page counts
as handled; a crash is the server process dying or a request raising in the client.
Memory is the server's resident set (VmRSS) after a warm-up of 20 valid requests, sampled
after every request, and at the end.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

VALID_SHARE = 4  # of every 10 requests


def rss_mb(pid: int) -> float:
    """The process's resident memory, NaN once it is gone (a server that died is reported, not a traceback)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except FileNotFoundError:
        return float("nan")
    raise RuntimeError(f"no VmRSS for process {pid}")


def make_inputs(tmp: Path, phantom_image: Path) -> dict[str, Path | None]:
    huge = tmp / "huge.jpg"
    Image.new("L", (12_000, 12_000), 40).save(huge, quality=50)
    claims_huge = tmp / "bomb.png"
    Image.new("1", (20_000, 20_000)).save(claims_huge)  # 1-bit zeros: tiny file, 400 Mpx header
    not_image = tmp / "notes.txt"
    not_image.write_text("this is not an image\n" * 100)
    return {"valid": phantom_image, "huge": huge, "bomb": claims_huge, "not_image": not_image}


def small_bundle(tmp: Path) -> tuple[Path, Path]:
    """A QCR head on the tiny CLIP tower trained briefly on a fresh phantom; returns (bundle, an image)."""
    from vqa.phantom import generate_phantom
    from vqa.train import TrainConfig, train

    generate_phantom(tmp / "phantom", n_images=120, seed=0, workers=0)
    bundle = train(TrainConfig(data=str(tmp / "phantom" / "vqa-rad"), head="qcr", out=str(tmp / "run"),
                               head_args={"hidden_dim": 64, "type_hidden": [32]}, embed_dim=32, question_dim=64,
                               epochs=3, progress=False, device="cpu", threads=1, cache_dir=str(tmp / "cache")))
    return bundle, next((tmp / "phantom" / "vqa-rad" / "images").iterdir())


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the demo exited with {proc.returncode} before answering")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"the demo did not answer at {url} within {timeout:.0f}s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default=None, help="bundle to serve (default: a small one trained here first)")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--port", type=int, default=7871)
    args = p.parse_args()
    from gradio_client import Client, handle_file

    # the server reads the bundle and inputs from here until it is stopped, inside the block
    with tempfile.TemporaryDirectory(prefix="medvqa-soak-") as folder:
        tmp = Path(folder)
        if args.bundle:
            bundle, image = Path(args.bundle), None
        else:
            bundle, image = small_bundle(tmp)
        image = image or next(Path(bundle).parent.rglob("*.jpg"), None)
        inputs = make_inputs(tmp, image)
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
        server = subprocess.Popen([sys.executable, "-m", "vqa.cli", "demo", "--bundle", str(bundle), "--port",
                                   str(args.port), "--threads", "1"], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{args.port}/"
        try:
            wait_ready(url, server)
            client = Client(url, verbose=False)
            mix = [("valid", "What imaging modality was used?")] * VALID_SHARE + [
                ("valid", ""), ("valid", "x" * 10_000), ("not_image", "Is there a lesion?"),
                ("huge", "Is there a lesion?"), ("bomb", "Is there a lesion?"), (None, "Is there a lesion?")]
            for _ in range(20):  # warm-up: imports, first allocations
                client.predict(handle_file(str(inputs["valid"])), "What imaging modality was used?", api_name="/ask")
            before = peak = rss_mb(server.pid)
            latencies, handled, replied, crashes, answered = [], 0, 0, 0, 0
            for i in range(args.requests):
                kind, question = mix[i % len(mix)]
                file = handle_file(str(inputs[kind])) if kind else None
                started = time.perf_counter()
                try:
                    answer, *_, status = client.predict(file, question, api_name="/ask")
                except Exception as e:  # the client saw no answer: count it, keep going
                    crashes += 1
                    print(f"request {i} ({kind}, {len(question)} chars): {type(e).__name__}: {e}", file=sys.stderr)
                    if server.poll() is not None:
                        print(f"the server died with {server.returncode}", file=sys.stderr)
                        break
                    continue
                seconds = time.perf_counter() - started
                if kind == "valid" and question.startswith("What"):
                    latencies.append(seconds)
                    answered += bool(answer)
                else:
                    handled, replied = handled + status.startswith("Error"), replied + 1
                peak = max(peak, rss_mb(server.pid))
            after = rss_mb(server.pid)
        finally:
            server.terminate()
            server.wait(timeout=30)
    latencies.sort()
    print(f"{args.requests} requests to {url} ({bundle}); server: `medvqa demo --threads 1`")
    print("| measure | value |\n|---|---|")
    print(f"| crashes (server died or no reply) | {crashes} |")
    print(f"| valid requests answered | {answered} / {len(latencies)} |")
    print(f"| bad requests answered with an in-page error | {handled} / {replied} |")
    print(f"| server RSS after warm-up / peak / at the end (MB) | {before:.0f} / {peak:.0f} / {after:.0f} |")
    print(f"| RSS growth (MB) | {after - before:+.0f} |")
    if latencies:
        p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
        print(f"| valid-request latency p50 / p99 (ms) | {1e3 * statistics.median(latencies):.0f} / {1e3 * p99:.0f} |")
    return 1 if crashes else 0


if __name__ == "__main__":
    raise SystemExit(main())
