"""What the benchmark scripts share: their default data, a fresh phantom."""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path


def dataset_or_phantom(data: str | None, tmp: Path, images: int = 400) -> str:
    """`data` when given, else a fresh `images`-image phantom (seed 0) in VQA-RAD's format under `tmp`."""
    if data is not None:
        return data
    from vqa.phantom import generate_phantom

    generate_phantom(tmp / "phantom", images, seed=0)
    return str(tmp / "phantom" / "vqa-rad")


def head_benchmark_parser(doc: str, encoder: str, head: str) -> argparse.ArgumentParser:
    """The options every head-training benchmark takes; `doc` is the script's docstring."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", default="vqa-rad", help="the dataset's on-disk format (default: vqa-rad)")
    p.add_argument("--data", default=None, help="dataset folder (default: a fresh 400-image phantom)")
    p.add_argument("--encoder", default=encoder)
    p.add_argument("--head", default=head)
    p.add_argument("--hidden", type=int, default=512,
                   help="head and question-GRU size; 512 is docs/results.md's recipe (MEVF: 1024, whose "
                        "recurrent GRU step then dominates the head's time)")
    p.add_argument("--batch-size", type=int, default=32)
    return p


def mean_std(values: list[float], fmt: str = ".3f") -> str:
    """Their mean, and ± their std when there are several."""
    return f"{statistics.fmean(values):{fmt}}" + (f" ± {statistics.stdev(values):{fmt}}" if len(values) > 1 else "")


def percent_mean_std(values: list[float], signed: bool = False) -> str:
    """Fractions as a percent cell: their mean, and ± their std when there are several (`signed`: +/- on the mean)."""
    cell = f"{100 * statistics.fmean(values):{'+' if signed else ''}.1f}"
    return cell + (f" ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else "")
