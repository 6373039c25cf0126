"""`medvqa push`: upload a bundle to the Hugging Face Hub, with its model card written or refreshed."""
from __future__ import annotations

from .options import command_parser

EXAMPLE = """examples:
  medvqa push runs/qcr/bundle my-org/qcr-vqa-rad
  medvqa push runs/qcr/bundle my-org/qcr-vqa-rad --private --commit-message "20 epochs, hidden 512"
  medvqa push runs/qcr/bundle my-org/qcr-vqa-rad --eval runs/qcr/test-slake --license cc-by-sa-4.0
  medvqa push runs/qcr/bundle my-org/qcr-vqa-rad --to-cache runs/hub-cache   # no upload: a local hub cache

First the bundle is loaded (a broken one is never uploaded) and its model card, BUNDLE/README.md,
is written: Hub metadata (license, library, tags, base model, model-index with the validation
metrics and the test metrics of every `medvqa eval` report inside the bundle or passed with
--eval) and what the model is for and not for. Then the repository is created if needed and the
folder uploaded (an onnx/ export inside it too). The token comes from HF_TOKEN or `hf auth login`.

What is uploaded names no folder of this machine: the paths that eval reports, encoder configs and
text-model configs record are reduced to "local:NAME" in the uploaded copy (the bundle stays as it
is). An eval report must have scored this bundle's weights (it records their digest). The test
questions themselves (eval-*/predictions.jsonl) stay behind unless --with-predictions; trust.safetensors,
which trust scores read, holds the content words of the training questions about each image.

--to-cache DIR writes the repository into DIR in the Hugging Face cache layout instead: with
HF_HUB_CACHE=DIR (and HF_HUB_OFFLINE=1), `--bundle my-org/qcr-vqa-rad` then loads it in every
command, with no network (a check before the real upload, or a copy for an offline machine)."""


def build_parser():
    p = command_parser("medvqa push", __doc__.split(": ", 1)[1], EXAMPLE)
    p.add_argument("bundle", help="bundle folder written by `medvqa train` (OUT/bundle)")
    p.add_argument("repo_id", help="Hugging Face Hub model repository, org/name (created if it does not exist)")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--commit-message", default=None, help="(default: 'Upload medvqa bundle NAME')")
    p.add_argument("--eval", action="append", default=[], metavar="DIR",
                   help="a `medvqa eval` output folder (or its metrics.json) to report in the card (repeatable; "
                        "BUNDLE/eval-*/ are included anyway)")
    p.add_argument("--license", default=None, help="the model's license id on the Hub (default: mit)")
    p.add_argument("--with-predictions", action="store_true",
                   help="also upload eval-*/predictions.jsonl (every test question, its reference answer and the "
                        "model's; left out by default: private data's questions are not the Hub's to hold)")
    p.add_argument("--to-cache", metavar="DIR", default=None,
                   help="write into a local Hugging Face cache folder instead of uploading (see below)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ..hub import CacheHub, push_bundle

    hub = CacheHub(args.to_cache) if args.to_cache else None
    result = push_bundle(args.bundle, args.repo_id, private=args.private, commit_message=args.commit_message,
                         hub=hub, eval_reports=args.eval, license_id=args.license,
                         with_predictions=args.with_predictions)
    where = f"{args.to_cache} (HF_HUB_CACHE={args.to_cache} loads it offline)" if args.to_cache else \
        f"https://huggingface.co/{args.repo_id}"
    print(f"medvqa push: {args.bundle} -> {args.repo_id} at {where}: {result}")
    return 0
