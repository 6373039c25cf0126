"""`medvqa predict`: answer questions about images with a trained bundle, as JSON."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import IO, Any

from ..errors import DataError
from ..io import read_jsonl_numbered

EXAMPLE = """examples:
  medvqa predict --bundle runs/demo/bundle --image scan.png --question "What imaging modality was used?"
  medvqa predict --bundle runs/demo/bundle --image ct.dcm --question "Is there a lesion?" --attention
  medvqa predict --bundle runs/demo/bundle --batch questions.jsonl --out answers.jsonl

--batch reads JSON lines {"image": PATH, "question": TEXT} (any other fields, e.g. "id", are
copied to the output); relative image paths are looked up next to the JSONL file, then in the
current folder. Each output line is the input line's fields plus the prediction, or an
"error" for a line that cannot be answered (the command then exits with status 1).

Scores are per-answer sigmoids for BCE-trained heads (MEVF, QCR; they do not sum to 1) and
a softmax over choices for multiple-choice heads: "score_kind" says which. "question_type"
comes from QCR's type router when the head has one, else from the answer (yes/no = closed):
"question_type_source" says which."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medvqa predict", description=__doc__.split(": ", 1)[1],
                                epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, help="bundle folder written by `medvqa train` (OUT/bundle)")
    g = p.add_argument_group("one question")
    g.add_argument("--image", help="image file: PNG, JPEG, TIFF (8/16-bit), DICOM, ...")
    g.add_argument("--question", help="the question, in quotes")
    g.add_argument("--choices", nargs="+", default=None, help="answer choices (multiple-choice heads only)")
    g = p.add_argument_group("many questions")
    g.add_argument("--batch", metavar="FILE.jsonl", help="JSON lines with image and question (see below)")
    g.add_argument("--out", metavar="FILE.jsonl", help="write the answers here (default: stdout)")
    g.add_argument("--batch-size", type=int, default=32, help="questions per forward pass (default: 32)")
    g = p.add_argument_group("output")
    g.add_argument("--top-k", type=int, default=5, help="answers to list with their scores (default: 5)")
    g.add_argument("--attention", action="store_true", help="include the attention grid in the JSON")
    g.add_argument("--heatmap", metavar="PNG", help="one question: save the image with its attention heatmap")
    g.add_argument("--device", default="cpu", help="cpu | cuda | auto (default: cpu)")
    g.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (default: 1, fastest for small models on shared cores)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    single = args.image is not None or args.question is not None
    if single == bool(args.batch):
        p.error("give either --image and --question, or --batch FILE.jsonl")
    if single and (args.image is None or args.question is None):
        p.error("--image and --question go together")
    if args.top_k < 1 or args.batch_size < 1:
        p.error("--top-k and --batch-size must be at least 1")
    from ..predictor import Predictor

    predictor = Predictor.from_bundle(args.bundle, device=args.device, threads=args.threads)
    if single:
        result = predictor.predict(args.image, args.question, top_k=args.top_k, choices=args.choices)
        if args.heatmap:
            result.overlay().save(args.heatmap)
        out = {"image": args.image, **result.to_dict(attention=args.attention)}
        if args.heatmap:
            out["heatmap"] = args.heatmap
        print(json.dumps(out, indent=2))
        return 0
    with _output(args.out) as sink:
        answered, failed = run_batch(predictor, Path(args.batch), sink, args.top_k, args.batch_size, args.attention)
    print(f"medvqa predict: answered {answered} question(s), {failed} failed"
          + (f"; wrote {args.out}" if args.out else ""), file=sys.stderr)
    return 1 if failed else 0


class _output:
    """stdout, or a file written to a temp name and renamed when complete."""

    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path else None

    def __enter__(self) -> IO[str]:
        if self.path is None:
            return sys.stdout
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        self.file = open(self.tmp, "w", encoding="utf-8")
        return self.file

    def __exit__(self, kind, *_) -> None:
        if self.path is None:
            sys.stdout.flush()
            return
        self.file.close()
        if kind is None:
            self.tmp.replace(self.path)
        else:
            self.tmp.unlink(missing_ok=True)




def resolve_image(value: Any, base: Path) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise DataError("needs an \"image\" field with a file path")
    path = Path(value).expanduser()
    if path.is_absolute():
        return path
    if (base / path).exists():
        return base / path
    if not path.exists():
        raise DataError(f"image file not found: {value} (looked in {base} and in the current folder)")
    return path


def run_batch(predictor, path: Path, sink: IO[str], top_k: int, batch_size: int, attention: bool) -> tuple[int, int]:
    """Answer every line of a JSONL file in chunks; returns (answered, failed)."""
    from ..predictor import check_question, read_image

    rows = read_jsonl_numbered(path)
    answered = failed = 0
    for start in range(0, len(rows), batch_size):
        chunk, results = rows[start:start + batch_size], {}
        images: dict[Path, Any] = {}  # each file read once per chunk
        valid = []
        for lineno, row in chunk:
            try:
                image_path = resolve_image(row.get("image"), path.parent)
                if image_path not in images:
                    images[image_path] = read_image(image_path)
                valid.append((lineno, images[image_path], check_question(row.get("question"))))
            except DataError as e:
                results[lineno] = {"error": str(e)}
        if valid:
            predictions = predictor.predict_batch([v[1] for v in valid], [v[2] for v in valid], top_k=top_k,
                                                  batch_size=batch_size)
            results.update({v[0]: p.to_dict(attention=attention) for v, p in zip(valid, predictions)})
        for lineno, row in chunk:
            result = results[lineno]
            failed += "error" in result
            answered += "error" not in result
            sink.write(json.dumps({**row, "line": lineno, **result}) + "\n")
    return answered, failed
