"""`medvqa predict`: answer questions about images with a trained bundle, as JSON."""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import IO, Any, Iterator

from ..errors import DataError
from ..io import atomic_write, read_csv_numbered, read_jsonl_numbered
from .options import (add_bundle_argument, add_device_arguments, add_runtime_argument, add_target_risk_argument,
                      apply_runtime, command_parser)

EXAMPLE = """examples:
  medvqa predict --bundle runs/demo/bundle --image scan.png --question "What imaging modality was used?"
  medvqa predict --bundle runs/demo/bundle --image ct.dcm --question "Is there a lesion?" --attention
  medvqa predict --bundle runs/demo/bundle --image ct.dcm --question "Is there a lesion?" --target-risk closed=0.05,open=0.2
  medvqa predict --bundle runs/demo/bundle --batch questions.jsonl --out answers.jsonl
  medvqa predict --bundle runs/demo/bundle --batch questions.csv --out answers.jsonl --no-progress
  medvqa predict --bundle org/name --image scan.png --question "Is there a lesion?"   # a Hub model
  medvqa predict --bundle runs/demo/bundle --runtime onnx --image scan.png --question "Is there a lesion?"

--batch reads JSON lines {"image": PATH, "question": TEXT[, "choices": [...]]} or a CSV file
(.csv) with columns image, question[, choices] (choices separated by "|"); any other fields or
columns (e.g. "id") are copied to the output. Relative image paths are looked up next to the
batch file, then in the current folder. Each output line is the input's fields plus the
prediction, or an "error" for a line that cannot be answered (the command then exits with
status 1). A progress bar goes to stderr (--no-progress hides it).

Scores are per-answer sigmoids for BCE-trained heads (MEVF, QCR; they do not sum to 1) and
a softmax over choices for multiple-choice heads: "score_kind" says which. "question_type"
comes from QCR's type router when the head has one, else from the answer (yes/no = closed):
"question_type_source" says which. "confidence" is the calibrated probability that the answer
is right (fitted on validation); "abstained": true means "not sure" ("abstain_reason" says why:
confidence under the risk target, an image unlike the training images, or a question of mostly
unknown words) and the answer should not be relied on. "familiarity" (0-1) is how nearly training
asked this question about this very image, "agreement" (-1-1) whether training answered it as the
model does: what the confidence read besides the model's scores (null for bundles that do not)."""


def build_parser():
    p = command_parser("medvqa predict", __doc__.split(": ", 1)[1], EXAMPLE)
    add_bundle_argument(p)
    g = p.add_argument_group("one question")
    g.add_argument("--image", help="image file: PNG, JPEG, TIFF (8/16-bit), DICOM, ...")
    g.add_argument("--question", help="the question, in quotes")
    g.add_argument("--choices", nargs="+", default=None, help="answer choices (multiple-choice heads only)")
    g = p.add_argument_group("many questions")
    g.add_argument("--batch", metavar="FILE", help="JSON lines, or a .csv file, with image and question (see below)")
    g.add_argument("--out", metavar="FILE.jsonl", help="write the answers here (default: stdout)")
    g.add_argument("--batch-size", type=int, default=32, help="questions per forward pass (default: 32)")
    g = p.add_argument_group("output")
    g.add_argument("--top-k", type=int, default=5, help="answers to list with their scores (default: 5)")
    g.add_argument("--attention", action="store_true", help="include the attention grid in the JSON")
    g.add_argument("--heatmap", metavar="PNG", help="one question: save the image with its attention heatmap")
    add_target_risk_argument(g, "the bundle's, set by `medvqa train --target-risk`")
    g.add_argument("--no-progress", action="store_true", help="no progress bar for --batch")
    g = p.add_argument_group("runtime")
    add_runtime_argument(g)
    add_device_arguments(g, device="cpu", threads=1, precision=False)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    single = args.image is not None or args.question is not None
    if single == bool(args.batch):
        p.error("give either --image and --question, or --batch FILE (.jsonl or .csv)")
    if single and (args.image is None or args.question is None):
        p.error("--image and --question go together")
    # options of the other mode would be read and silently dropped: name them instead
    misplaced = ([("--out", args.out)] if single else [("--choices", args.choices), ("--heatmap", args.heatmap)])
    for flag, value in misplaced:
        if value is not None:
            p.error(f"{flag} goes with {'--batch' if single else '--image and --question'} (one question's JSON "
                    "goes to stdout; a batch row gives its own choices)")
    if args.top_k < 1 or args.batch_size < 1:
        p.error("--top-k and --batch-size must be at least 1")
    from ..predictor import Predictor

    device = apply_runtime(args)
    predictor = Predictor.from_pretrained(args.bundle, runtime=args.runtime, device=device, threads=args.threads,
                                          target_risk=args.target_risk)
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
        answered, failed = run_batch(predictor, Path(args.batch), sink, args.top_k, args.batch_size, args.attention,
                                     progress=not args.no_progress)
    print(f"medvqa predict: answered {answered} question(s), {failed} failed"
          + (f"; wrote {args.out}" if args.out else ""), file=sys.stderr)
    return 1 if failed else 0


@contextlib.contextmanager
def _output(path: str | None) -> Iterator[IO[str]]:
    """stdout, or a file written to a temp name and renamed when complete."""
    if path is None:
        yield sys.stdout
        sys.stdout.flush()
        return
    with atomic_write(path) as f:
        yield f


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


def read_batch(path: Path) -> list[tuple[int, dict]]:
    """(line, row) of a JSON-lines file, or of a CSV file (by its .csv suffix) with columns image, question."""
    if path.suffix.lower() == ".csv":
        return read_csv_numbered(path, ("image", "question"))
    return read_jsonl_numbered(path)


def parse_choices(value: Any) -> list[str] | None:
    """A row's choices: a JSON list, or text separated by "|" (CSV); None when absent or empty."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = [c.strip() for c in value.split("|")]
    if not isinstance(value, list) or not all(isinstance(c, str) and c.strip() for c in value) or not value:
        raise DataError("\"choices\" must be a list of non-empty texts (in a CSV: separated by |)")
    return [c.strip() for c in value]


def run_batch(predictor, path: Path, sink: IO[str], top_k: int, batch_size: int, attention: bool,
              progress: bool = False) -> tuple[int, int]:
    """Answer every row of a JSONL or CSV file in chunks, with a progress bar on stderr; returns (answered, failed)."""
    from tqdm import tqdm

    rows = read_batch(path)
    answered = failed = 0
    with tqdm(total=len(rows), unit="question", desc="answering", disable=not progress, file=sys.stderr) as bar:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            results = _answer_chunk(predictor, chunk, path.parent, top_k, batch_size, attention)
            for lineno, row in chunk:
                result = results[lineno]
                failed += "error" in result
                answered += "error" not in result
                sink.write(json.dumps({**row, "line": lineno, **result}) + "\n")
            bar.update(len(chunk))
    return answered, failed


def _answer_chunk(predictor, chunk: list[tuple[int, dict]], base: Path, top_k: int, batch_size: int,
                  attention: bool) -> dict[int, dict]:
    """line -> the prediction's JSON, or {"error": ...} for a row that cannot be answered."""
    from ..predictor import check_choices, check_question, read_image

    results: dict[int, dict] = {}
    images: dict[Path, Any] = {}  # each file read once per chunk
    valid = []
    needs_choices = predictor.runtime.needs_choices
    for lineno, row in chunk:
        try:
            image_path = resolve_image(row.get("image"), base)
            question = check_question(row.get("question"))
            choices = parse_choices(row.get("choices"))
            if needs_choices and choices is None:
                raise DataError("this bundle's head picks among choices: give the row \"choices\"")
            if choices is not None and not needs_choices:
                raise DataError("this bundle's head answers from its vocabulary; the row's \"choices\" cannot be used")
            if choices is not None:
                check_choices(choices)  # here, so that the row fails alone, not the chunk it is in
            if image_path not in images:
                images[image_path] = read_image(image_path)
            valid.append((lineno, images[image_path], question, choices))
        except DataError as e:
            results[lineno] = {"error": str(e)}
    if valid:
        predictions = predictor.predict_batch([v[1] for v in valid], [v[2] for v in valid], top_k=top_k,
                                              batch_size=batch_size,
                                              choices=[v[3] for v in valid] if needs_choices else None)
        results.update({v[0]: p.to_dict(attention=attention) for v, p in zip(valid, predictions)})
    return results
