"""Real data, one command: MEVF reproduction on VQA-RAD, CLIP pretraining on MedPix 2.0, results table.

    .venv/bin/python benchmarks/real_vqa_rad.py --data ../shared/data --out runs/real
    .venv/bin/python benchmarks/real_vqa_rad.py --quick          # a few epochs, to check the plumbing

Steps (each skipped when its outputs exist, so an interrupted run continues):
1. import MEVF's released weights (restricted unpickler) -> safetensors encoder + GloVe table;
2. pretrain a CLIP image tower on MedPix 2.0 train (VQA-RAD images excluded), text tower frozen
   MiniLM, and a shuffled-caption control; dev retrieval R@1/5/10 against the untrained tower;
3. train mevf-ban / mevf-san / qcr on VQA-RAD train with (a) MEVF's image side + GloVe,
   (b) the MedPix-pretrained tower frozen, (c) the same tower untrained; each with the
   train-only and MEVF's train+test answer vocabularies; validation carved from train by
   question (VQA-RAD's own split is by question), never the test set;
4. evaluate on the 451-question test and MEVF's 308 freeform subset, write docs/results.md,
   docs/results.json and docs/real_vqa_rad_per_type.png.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("real_vqa_rad")

CNN = {"image_size": 128, "model_kwargs": {"channels": [16, 32, 64, 128], "stem_width": 16}}
HEADS = ("mevf-ban", "mevf-san", "qcr")
PUBLISHED = [  # (method, open, closed, overall, test set, source)
    ("MEVF-BAN (paper)", 43.9, 75.1, 62.6, "freeform 308", "Nguyen et al. 2019"),
    ("MEVF-SAN (paper)", 40.7, 74.1, 60.8, "freeform 308", "Nguyen et al. 2019"),
    ("PubMedCLIP-QCR (paper)", 60.1, 80.0, 72.1, "full 451", "Eslami et al. 2023"),
    ("PMC-CLIP (paper)", 67.0, 84.0, 77.6, "full 451", "Lin et al. 2023"),
]


@dataclass(frozen=True)
class Run:
    row: str  # a | b | c
    encoder: str
    mode: str  # frozen | finetune
    head: str
    vocab: str  # train | candidates

    @property
    def name(self) -> str:
        return f"{self.row}-{self.head}-{self.mode}-{self.vocab}"


def import_step(data: Path, out: Path) -> Path:
    from vqa.commands.import_weights import import_mevf

    if not (out / "mevf" / "encoder" / "model.safetensors").is_file():
        import_mevf(data / "mevf", out / "mevf", overwrite=True)
    return out / "mevf"


def pretrain_step(data: Path, out: Path, epochs: int, threads: int) -> dict:
    """MedPix CLIP pretraining and its shuffled-caption control; returns dev retrieval metrics."""
    from pretrain import PretrainConfig, pretrain

    results = {}
    for name, shuffle in (("medpix-clip", False), ("medpix-clip-shuffled", True)):
        folder = out / name
        if not (folder / "metrics.json").is_file():
            pretrain(PretrainConfig(data=str(data / "medpix2"), val_split="dev", exclude_vqa_rad=True,
                                    encoder="timm:resnet10t", encoder_args=CNN, text="minilm", augment=True,
                                    epochs=epochs, lr=2e-3, out=str(folder), threads=threads,
                                    shuffle_captions=shuffle, progress=False))
        results[name] = json.loads((folder / "metrics.json").read_text())
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


def vqa_step(run: Run, data: Path, out: Path, epochs: int, threads: int, glove: Path) -> dict:
    from vqa.evaluate import evaluate, write_outputs
    from vqa.train import TrainConfig, train

    folder = out / "vqa" / run.name
    if (folder / "eval" / "metrics.json").is_file():
        return json.loads((folder / "eval" / "metrics.json").read_text())
    rad = data / "vqa-rad"
    cfg = TrainConfig(dataset="vqa-rad", data=str(rad), val_by="question", encoder=run.encoder,
                      encoder_mode=run.mode, head=run.head, glove=str(glove), epochs=epochs, batch_size=32,
                      answers="train" if run.vocab == "train" else str(rad / "answer_all_list.json"),
                      out=str(folder), cache_dir=str(out / "cache"), threads=threads, progress=False)
    started = time.perf_counter()
    bundle = train(cfg)
    report, records, preds = evaluate(bundle, "vqa-rad", str(rad), cache_dir=str(out / "cache"), progress=False)
    history = json.loads((folder / "history.json").read_text())
    report["timing"] = {"train_seconds": time.perf_counter() - started,
                        "epoch_seconds": sum(h["seconds"] for h in history) / len(history)}
    report["best_epoch"] = json.loads((bundle / "metrics.json").read_text())["best_epoch"]
    write_outputs(report, records, preds, folder / "eval")
    return report


def _runs(mevf: Path, medpix: Path, untrained: Path, heads, vocabs) -> list[Run]:
    runs = []
    for vocab in vocabs:
        runs.append(Run("a", str(mevf / "encoder"), "finetune", "mevf-ban", vocab))
        for head in heads:
            runs.append(Run("a", str(mevf / "encoder"), "frozen", head, vocab))
            runs.append(Run("b", str(medpix / "encoder"), "frozen", head, vocab))
            runs.append(Run("c", str(untrained), "frozen", head, vocab))
    return runs


ROW_NAMES = {"a": "MEVF image side + GloVe (imported)", "b": "CLIP CNN pretrained on MedPix 2.0",
             "c": "same CNN, untrained"}


def _cell(m: dict) -> str:
    return f"{100 * (m.get('open') or 0):.1f} / {100 * (m.get('closed') or 0):.1f} / {100 * m['overall']:.1f}"


def write_results(results: dict[str, dict], runs: list[Run], pretraining: dict, out_md: Path, epochs: int) -> None:
    lines = ["# Results on real data", "",
             "Generated by `benchmarks/real_vqa_rad.py` on a 2-core CPU machine (no GPU); rerun it to refresh.",
             "", "## VQA-RAD", "",
             f"Open / closed / overall accuracy (%). Ours: {epochs} epochs, batch 32, the epoch chosen on a "
             "validation split carved from train by question (10%, seed 0), never on test; closed/open from "
             "the dataset's own answer_type. *train-only*: answer vocabulary from train; *candidates*: MEVF's "
             "`answer_all_list.json` (built by the references with test answers). Published rows chose their "
             "epoch on test and use the candidate list.", "",
             "| method | image side | head | vocabulary | freeform 308 | full 451 | epoch (s) |",
             "|---|---|---|---|---|---|---|"]
    for name, op, cl, ov, subset, source in PUBLISHED:
        cell = f"{op} / {cl} / {ov}"
        lines.append(f"| {name} | {source} | | candidates | {cell if 'freeform' in subset else ''} | "
                     f"{cell if 'full' in subset else ''} | |")
    for run in runs:
        r = results.get(run.name)
        if not r:
            continue
        s = r["subsets"]
        lines.append(f"| ours ({run.row}) | {ROW_NAMES[run.row]}, {run.mode} | {run.head} | "
                     f"{'train-only' if run.vocab == 'train' else 'candidates'} | {_cell(s['freeform'])} | "
                     f"{_cell(s['all'])} | {r['timing']['epoch_seconds']:.1f} |")
    lines += ["", "![accuracy per question type](real_vqa_rad_per_type.png)", "", "## MedPix 2.0 retrieval", "",
              "Image→text and text→image recall (%) on `dev` (197 pairs), image tower a small ResNet "
              "(resnet10t, 128 px), text tower MiniLM frozen (LiT-style), VQA-RAD images excluded from "
              "training.", "", "| model | i→t R@1 | R@5 | R@10 | t→i R@1 | R@5 | R@10 |", "|---|---|---|---|---|---|---|"]
    clip = pretraining["medpix-clip"]
    for label, m in (("untrained", clip["before"]["retrieval"]), ("pretrained", clip["after"]["retrieval"]),
                     ("shuffled-caption control", pretraining["medpix-clip-shuffled"]["after"]["retrieval"])):
        lines.append(f"| {label} | " + " | ".join(f"{m[f'{d}_r{k}']:.1f}" for d in ("i2t", "t2i")
                                                    for k in (1, 5, 10)) + " |")
    out_md.write_text("\n".join(lines) + "\n")


def plot_per_type(results: dict[str, dict], runs: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [r for r in runs if r.vocab == "train" and r.mode == "frozen" and r.name in results]
    types = sorted({t for r in chosen for t, v in results[r.name]["subsets"]["all"]["per_question_type"].items()
                    if v["n"] >= 5})
    fig, ax = plt.subplots(figsize=(12, 4))
    width = 0.8 / max(len(chosen), 1)
    for i, run in enumerate(chosen):
        per = results[run.name]["subsets"]["all"]["per_question_type"]
        ax.bar([j + i * width for j in range(len(types))], [100 * (per.get(t, {}).get("accuracy") or 0)
                                                             for t in types], width, label=f"({run.row}) {run.head}")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(types))], types, rotation=30)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("VQA-RAD test (451), per question type, frozen image side, train-only vocabulary")
    ax.legend(ncol=3, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    p.add_argument("--out", type=Path, default=Path("runs/real"))
    p.add_argument("--docs", type=Path, default=Path("docs"))
    p.add_argument("--epochs", type=int, default=20, help="VQA epochs (MEVF: 20)")
    p.add_argument("--pretrain-epochs", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="2 epochs, one head, one vocabulary")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not (args.data / "vqa-rad" / "trainset.json").is_file():
        raise SystemExit(f"{args.data}: no vqa-rad/trainset.json (see ../shared/data/README.md)")
    epochs, pepochs = (2, 2) if args.quick else (args.epochs, args.pretrain_epochs)
    heads, vocabs = (("mevf-ban",), ("train",)) if args.quick else (HEADS, ("train", "candidates"))
    args.out.mkdir(parents=True, exist_ok=True)
    mevf = import_step(args.data, args.out)
    pretraining = pretrain_step(args.data, args.out, pepochs, args.threads)
    runs = _runs(mevf, args.out / "medpix-clip", untrained_encoder(args.out), heads, vocabs)
    results = {}
    for run in runs:
        log.info("VQA-RAD run %s", run.name)
        results[run.name] = vqa_step(run, args.data, args.out, epochs, args.threads, mevf / "glove_300d.txt")
        (args.out / "results.json").write_text(json.dumps({"runs": results, "pretraining": pretraining}, indent=1))
    args.docs.mkdir(parents=True, exist_ok=True)
    plot_per_type(results, runs, args.docs / "real_vqa_rad_per_type.png")
    write_results(results, runs, pretraining, args.docs / "results.md", epochs)
    summary = {k: {s: {m: v["subsets"][s].get(m) for m in ("open", "closed", "overall")} for s in v["subsets"]}
               for k, v in results.items()}
    (args.docs / "results.json").write_text(json.dumps({"vqa_rad": summary, "medpix_retrieval": {
        k: {"before": v["before"]["retrieval"], "after": v["after"]["retrieval"]} for k, v in pretraining.items()}},
        indent=1) + "\n")
    print((args.docs / "results.md").read_text())


if __name__ == "__main__":
    main()
