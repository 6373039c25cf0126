"""Option groups shared by the commands, and the one way a parsed command line becomes a config dataclass.

One flag name per concept: `--format` is a VQA dataset's on-disk format in every command,
`--data` its folder, `--lang` its question language; the engine's flags (optimisation,
runtime, outputs) are the same in `train` and `pretrain`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from ..errors import DataError

FORMAT_CHOICES = ("vqa-rad", "slake", "pmc-vqa", "pathvqa", "hf")  # vqa.data.FORMATS (not imported: fast --help)
LR_SCHEDULES = ("cosine", "constant", "mevf-step")  # vqa.training.LR_SCHEDULES (not imported: fast --help)


def command_parser(prog: str, description: str, example: str) -> argparse.ArgumentParser:
    """A parser whose --help ends with the command's examples, formatted as written."""
    return argparse.ArgumentParser(prog=prog, description=description, epilog=example,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_dataset_arguments(group, *, data_default: str | None = None, data_positional: bool = False,
                          required: bool | None = None) -> None:
    """--format (required unless defaulted by the caller), --data (or a positional ROOT), --lang;
    `required=False`: the command checks itself (another flag can stand in for --data)."""
    if data_positional:
        group.add_argument("root", help="dataset folder (or a `datasets` folder / hub id with --format hf)")
    else:
        group.add_argument("--data", default=data_default,
                           required=data_default is None if required is None else required,
                           help="dataset folder (or a `datasets` folder / hub id with --format hf)"
                           + (f" (default: {data_default})" if data_default else ""))
    group.add_argument("--lang", default="en", help="question language: en, zh (SLAKE) or all (default: en)")


def add_format_argument(group, default: str | None = None, required: bool | None = None) -> None:
    group.add_argument("--format", default=default, required=default is None if required is None else required,
                       choices=FORMAT_CHOICES,
                       help="the dataset's on-disk format" + (f" (default: {default})" if default else ""))


def add_device_arguments(group, *, device: str | None = "auto", threads: int | None = None,
                         precision: bool = True) -> None:
    """--device (unless `device` is None: commands whose work runs on the CPU only), --threads, --precision."""
    if device is not None:
        group.add_argument("--device", default=device, help=f"auto | cpu | cuda | cuda:N (default: {device})")
    group.add_argument("--threads", type=int, default=threads,
                       help="CPU threads for torch (default: " + (str(threads) if threads else "one per core") +
                       "; 1 is several times faster when another job shares the cores)")
    if precision:
        group.add_argument("--precision", default="fp32",  # checked by vqa.training.check_precision
                           help="fp32 | bf16 | fp16 (fp16: CUDA only, with loss scaling) (default: fp32)")


def add_recorded_data_arguments(parser, whose: str) -> None:
    """The bundle(s)' training data (--format, --data, --cache-dir) and, for bundles that do not record it, how their
    validation split was carved (--val-split/-fraction/-by/-seed): rebuilt, then checked against the bundles."""
    g = parser.add_argument_group(f"data ({whose} training data: the validation split is rebuilt from it)")
    add_format_argument(g)
    g.add_argument("--data", required=True, help="dataset folder (or a `datasets` folder / hub id with --format hf)")
    g.add_argument("--cache-dir", default=None, help="feature cache root (default: $MEDVQA_CACHE/features)")
    g = parser.add_argument_group("validation split, for bundles that do not record it")
    g.add_argument("--val-split", default=None, help="'auto', 'carved' or a split name")
    g.add_argument("--val-fraction", type=float, default=None)
    g.add_argument("--val-by", default=None, choices=["image", "question"])
    g.add_argument("--val-seed", type=int, default=None)


def add_weights_dtype_argument(group, measured: str) -> None:
    """--weights-dtype: the bundle's stored head weights; `measured` names what is computed on the rounded copy."""
    from ..bundle import WEIGHTS_DTYPES

    group.add_argument("--weights-dtype", default="float32", choices=list(WEIGHTS_DTYPES),
                       help="float16 halves the bundle (the head's weights, text tower included; read back as "
                            f"float32), rounded before {measured}, so that what is measured is what is saved "
                            "(default: %(default)s)")


def add_target_risk_argument(group, default_help: str, default: str | None = None) -> None:
    """--target-risk: the abstention target, one share for every branch or per branch (`vqa.target_risk`), read
    by the command's config (the text, or `default`)."""
    group.add_argument("--target-risk", default=default, metavar="RISK",
                       help="abstain below the confidence at which validation answers were wrong at most this share "
                            "of the time: one number (0.1), or per branch (closed=0.05,open=0.2: yes/no answers are "
                            f"right far more often than open ones; a branch not named takes the number given "
                            f"alone, else 0.1) (default: {default_help})")


def add_ood_encoder_argument(group, default_help: str, default: str | None = None) -> None:
    """--ood-encoder: the feature space of the out-of-scope image detector (`vqa.ood`)."""
    group.add_argument("--ood-encoder", default=default, metavar="ENCODER",
                       help="judge whether an image is out of scope in the pooled features of this frozen encoder "
                            "(a registered name, folder or hub id; efficientnet-lite0-imagenet: ImageNet features, "
                            "which tell photographs from scans where MEVF's small grayscale encoders cannot), or "
                            f"'same': the model's own image encoder (default: {default_help})")


def add_bundle_argument(parser, *, required: bool = True, help_default: str = "") -> None:
    """--bundle: a bundle folder or a Hugging Face Hub id (resolved by `vqa.hub.resolve_bundle`)."""
    parser.add_argument("--bundle", required=required, default=None,
                        help="bundle folder (`medvqa train`'s OUT/bundle) or a Hugging Face Hub model id org/name "
                             "(downloaded once into the hub cache; HF_HUB_OFFLINE=1 reads the cache only)"
                             + help_default)


def add_runtime_argument(group) -> None:
    """--runtime: the network in PyTorch, or the bundle's ONNX export in onnxruntime (`medvqa export onnx`)."""
    group.add_argument("--runtime", default="torch", choices=["torch", "onnx"],
                       help="torch (default), or onnx: the bundle's ONNX export (`medvqa export onnx`, in the "
                            "bundle's onnx/ folder) run by onnxruntime on the CPU; --threads sets its threads too")


def apply_runtime(args: argparse.Namespace):
    """Act on a command's --threads, --device and --precision (those it has); returns the torch device or None."""
    import torch

    from ..training import check_precision, resolve_device

    threads = getattr(args, "threads", None)
    if threads is not None:
        if threads < 1:
            raise DataError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)  # on shared cores, fewer threads than cores is faster
    if not hasattr(args, "device"):
        return None
    if getattr(args, "runtime", "torch") == "onnx" and args.device == "auto":
        return torch.device("cpu")  # onnxruntime runs here on its CPU provider: auto is the CPU even beside a GPU
    device = resolve_device(args.device)
    if hasattr(args, "precision"):
        check_precision(args.precision, device)
    return device


def add_engine_arguments(parser: argparse.ArgumentParser, defaults) -> dict:
    """The groups of every training command, with `defaults` (an EngineConfig subclass instance);
    returns them by title ("optimisation", "runtime", "outputs") for the command's own flags."""
    groups = {}
    g = groups["optimisation"] = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=defaults.epochs)
    g.add_argument("--schedule-epochs", type=int, default=defaults.schedule_epochs, metavar="N",
                   help="the learning-rate schedule's length in epochs (default: --epochs); longer, the run stops "
                        "partway down it with a bundle of its own, and a run resumed from its checkpoint (--resume "
                        "PATH --epochs M) continues down it, e.g. the first 60 of 200 epochs, then the rest")
    g.add_argument("--batch-size", type=int, default=defaults.batch_size,
                   help="per process (default: %(default)s)")
    g.add_argument("--lr", type=float, default=defaults.lr)
    g.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    g.add_argument("--warmup-epochs", type=float, default=defaults.warmup_epochs)
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=defaults.lr_schedule,
                   help="after the warmup: cosine decay to 0, or constant; mevf-step: MEVF's released schedule, "
                        "its own warmup (x0.5 to x2 over 4 epochs; --warmup-epochs 0) then x0.75 at epochs 11, 13, "
                        "15, 17 and 19 (default: %(default)s)")
    g.add_argument("--clip-norm", type=float, default=defaults.clip_norm, help="0 = no clipping (default: %(default)s)")
    g.add_argument("--ema-decay", type=float, default=None,
                   help="score, select and keep an exponential moving average of the weights, e.g. 0.999")
    g = groups["runtime"] = parser.add_argument_group("runtime")
    add_device_arguments(g, device=defaults.device)
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile the model")
    g.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="the trained image and text towers recompute their activations in the backward pass instead "
                        "of keeping them: much less memory, about a third more compute, the same gradients (a "
                        "BatchNorm encoder needs --encoder-norm frozen)")
    g.add_argument("--sync-every", type=int, default=defaults.sync_every, metavar="STEPS",
                   help="read the losses back to the host every STEPS optimizer steps, so that a GPU is not kept "
                        "waiting for each read (default 0: every step on a CPU, every 32 on a GPU); a NaN is "
                        "still reported with the step that made it")
    g.add_argument("--seed", type=int, default=defaults.seed)
    g = groups["outputs"] = parser.add_argument_group("outputs")
    g.add_argument("--out", default=defaults.out, help="output folder (default: %(default)s)")
    g.add_argument("--resume", default=None, help="'latest' (OUT/checkpoint.pt) or a checkpoint path")
    g.add_argument("--stop-after", type=int, default=None, help="end this run after N epochs (resume later)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--config", metavar="FILE",
                   help="rerun a recorded run: its run_config.json (or a bundle's, given the bundle folder or Hub "
                        "id) gives every value the command line does not (needs --out; --resume, --stop-after and "
                        "--no-progress are not taken from it), e.g. --config runs/ban/run_config.json --seed 1 "
                        "--out runs/ban-seed1")
    return groups


def parse_key_values(items: list[str], flag: str) -> dict:
    """['hidden_dim=512', 'k=3'] -> {'hidden_dim': 512, 'k': 3}; values are JSON when they parse as JSON."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DataError(f"{flag} {item!r}: expected KEY=VALUE, e.g. hidden_dim=512")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def config_from_args(cls: type, args: argparse.Namespace, recorded: dict | None = None) -> Any:
    """The dataclass `cls` from parsed arguments: same-named fields copied, each repeatable `--x-arg KEY=VALUE`
    into the dict field `x_args`, `--no-progress` into `progress`; `recorded` (fields of a recorded run) under them,
    its `x_args` updated key by key."""
    values = vars(args)
    fields = {f.name for f in dataclasses.fields(cls)}
    config = dict(recorded or {})
    config.update({k: v for k, v in values.items() if k in fields})
    for key, items in values.items():
        if key.endswith("_arg") and f"{key}s" in fields:
            config[f"{key}s"] = {**config.get(f"{key}s", {}),
                                 **parse_key_values(items, f"--{key.replace('_', '-')}")}
    if "progress" in fields and "no_progress" in values:
        config["progress"] = not values["no_progress"]
    return cls(**config)


def config_from_command_line(cls: type, parser: argparse.ArgumentParser, argv: list[str] | None) -> Any:
    """The training config `cls` from `argv`; with --config FILE, FILE's recorded values (a run_config.json) stand
    where `argv` gives no flag."""
    args = parser.parse_args(argv)
    if args.config is None:
        return config_from_args(cls, args)
    recorded = read_recorded_config(cls, args.config)
    # Parse again with no defaults, so that only the flags actually given override the recorded run.
    actions = [(a, a.default, a.required) for a in parser._actions]
    try:
        for action, _, _ in actions:
            action.default, action.required = argparse.SUPPRESS, False
        given = parser.parse_args(argv)
    finally:
        for action, default, required in actions:
            action.default, action.required = default, required
    if "out" not in vars(given):
        raise DataError(f"--config {args.config}: give the rerun its own --out (the recorded run's is "
                        f"{recorded.get('out', cls.out)!r}; to continue that run, use --out with it and --resume latest)")
    from ..io import LOCAL_PATH

    invocation = set(cls.INVOCATION_FIELDS)
    missing = {f"--{k.replace('_', '-')}": v for k, v in recorded.items()
               if isinstance(v, str) and v.startswith(LOCAL_PATH) and k not in given}
    for k, values in recorded.items():  # encoder_args -> --encoder-arg KEY=VALUE, given again key by key
        if isinstance(values, dict):
            again = {item.split("=", 1)[0] for item in getattr(given, k[:-1], None) or ()}
            missing.update({f"--{k[:-1].replace('_', '-')} {key}=...": v for key, v in values.items()
                            if isinstance(v, str) and v.startswith(LOCAL_PATH) and key not in again})
    if missing:
        flags = ", ".join(f"{flag} (it was {v[len(LOCAL_PATH):]!r})" for flag, v in missing.items())
        raise DataError(f"--config {args.config}: recorded on another machine, it names local files or folders you "
                        f"give again here: {flags}")
    return config_from_args(cls, given, {k: v for k, v in recorded.items() if k not in invocation})


def read_recorded_config(cls: type, path: str) -> dict:
    """The fields of a recorded run_config.json, checked against `cls` (a file of another command is refused)."""
    from ..hub import is_repo_id, resolve_bundle
    from ..io import read_json

    if is_repo_id(path) or Path(path).is_dir():  # a bundle (shared on the Hub, or a folder): its recipe
        path = str(resolve_bundle(path) / "run_config.json")
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object of a run's settings (a run_config.json), got "
                        f"{type(data).__name__}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise DataError(f"{path}: {', '.join(unknown)}: not settings of this command (a run_config.json written by "
                        "another command, or by another version of medvqa?)")
    return data
