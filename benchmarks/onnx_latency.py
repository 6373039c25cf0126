"""Answer latency of the onnxruntime runtime against PyTorch's, side by side in one run, on 1 CPU thread.

    python benchmarks/onnx_latency.py                          # a small QCR bundle trained here on the phantom
    python benchmarks/onnx_latency.py --bundle runs/qcr/bundle --questions 200

Each timed call is `Predictor.predict(image_path, question)`: decode the image file, prepare the
pixels, run the encoder and the head, decode and calibrate the answer: everything but the two
graphs is the same code for both runtimes. Calls alternate between the runtimes (torch, onnx,
torch, ...) so that both see the same machine load; after 5 warm-up answers each, the median
and p90 of --questions answers are reported, and the ratio of the medians (onnx / torch: below 1,
onnxruntime is faster). The ONNX export is written to a temporary folder (`medvqa export onnx`).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def small_bundle(tmp: Path) -> Path:
    """The test suite's recipe (tests/_bundle.py): QCR on the tiny CLIP tower, 240 phantom images, 20 epochs."""
    from vqa.phantom import generate_phantom
    from vqa.train import TrainConfig, train

    generate_phantom(tmp / "phantom", n_images=240, seed=3, workers=0)
    head_args = {"hidden_dim": 64, "glimpses": 1, "attention_dropout": 0.0, "classifier_dropout": 0.0,
                 "dropout": 0.0, "type_hidden": [32]}
    return train(TrainConfig(data=str(tmp / "phantom" / "vqa-rad"), out=str(tmp / "run"), encoder="clip-vit-tiny",
                             head="qcr", head_args=head_args, embed_dim=64, question_dim=64, epochs=20, batch_size=32,
                             lr=3e-3, device="cpu", cache_dir=str(tmp / "features"), progress=False))


def questions_for(tmp: Path) -> list[tuple[Path, str]]:
    """(image, question) pairs: the phantom's test split when it is there, else freshly generated phantom images."""
    from vqa.phantom import generate_phantom

    truth = tmp / "phantom" / "phantom.jsonl"
    if not truth.is_file():
        generate_phantom(tmp / "phantom", n_images=20, seed=11, workers=0)
    pairs = []
    for line in truth.read_text().splitlines():
        item = json.loads(line)
        if item["split"] == "test" or len(pairs) < 8:
            pairs += [(tmp / "phantom" / "vqa-rad" / "images" / item["file"], qa["question"]) for qa in item["qa"]]
    return pairs


def summary(times: list[float]) -> dict:
    times = sorted(times)
    return {"n": len(times), "median_ms": statistics.median(times), "p90_ms": times[int(0.9 * (len(times) - 1))],
            "mean_ms": statistics.fmean(times)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default=None, help="bundle folder (default: a small QCR bundle trained here)")
    p.add_argument("--questions", type=int, default=100, help="timed answers per runtime (default: 100)")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = p.parse_args(argv)
    import torch

    from vqa import Predictor
    from vqa.onnx_export import export_onnx

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        bundle = Path(args.bundle) if args.bundle else small_bundle(tmp)
        export = export_onnx(bundle, tmp / "onnx")
        runtimes = {"torch": Predictor.from_bundle(bundle, threads=1), "onnx": Predictor.from_onnx(export.folder,
                                                                                                  threads=1)}
        pairs = questions_for(tmp)
        for predictor in runtimes.values():
            for image, question in pairs[:5]:
                predictor.predict(image, question)
        times: dict[str, list[float]] = {name: [] for name in runtimes}
        for i in range(args.questions):
            image, question = pairs[i % len(pairs)]
            for name, predictor in runtimes.items():
                start = time.perf_counter()
                predictor.predict(image, question)
                times[name].append((time.perf_counter() - start) * 1e3)
    import onnxruntime

    result = {"bundle": str(args.bundle or "small phantom QCR bundle (clip-vit-tiny, 64 px)"), "cpus": os.cpu_count(),
              "threads": 1, "torch_version": torch.__version__, "onnxruntime_version": onnxruntime.__version__,
              "export_max_abs_diff": export.max_abs_diff, **{name: summary(t) for name, t in times.items()}}
    result["ratio_onnx_over_torch"] = result["onnx"]["median_ms"] / result["torch"]["median_ms"]
    print(f"bundle: {result['bundle']}; {result['cpus']} CPUs, 1 thread each; torch {result['torch_version']}, "
          f"onnxruntime {result['onnxruntime_version']}\n")
    print("| runtime | median | p90 | mean |\n|---|---|---|---|")
    for name in runtimes:
        s = result[name]
        print(f"| {name} | {s['median_ms']:.2f} ms | {s['p90_ms']:.2f} ms | {s['mean_ms']:.2f} ms |")
    print(f"\nonnxruntime / PyTorch, median answer latency: {result['ratio_onnx_over_torch']:.2f}x "
          f"({1 / result['ratio_onnx_over_torch']:.2f}x {'faster' if result['ratio_onnx_over_torch'] < 1 else 'slower'}"
          f" with onnxruntime); largest graph difference {max(export.max_abs_diff.values(), default=0):.1e}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
