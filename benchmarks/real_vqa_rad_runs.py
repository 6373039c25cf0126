"""What the real-data benchmark runs: its rows as `Run`s, the recipe every head run shares, the transfer steps.

benchmarks/real_vqa_rad.py trains and evaluates them; benchmarks/real_vqa_rad_docs.py renders their results,
benchmarks/real_vqa_rad_results.py keeps and merges them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

CNN = {"image_size": 128, "model_kwargs": {"channels": [16, 32, 64, 128], "stem_width": 16}}
HEADS = ("mevf-ban", "mevf-san", "qcr")
IMAGENET_HEADS = ("mevf-ban", "qcr")  # rows d/e
LITE0 = "efficientnet-lite0-imagenet"
LITE2 = "efficientnet-lite2-imagenet"
PAPER_EPOCHS = 20  # MEVF's schedule
# Recorded by every run since the carve keeps the copies of one (image, question) pair on one side; rows without
# it were carved before (real_vqa_rad_reading.md, "Validation carve"), and the tables mark the rows that have it
# with §.
CARVE = "by question, copies of an (image, question) pair together"


@dataclass(frozen=True)
class Run:
    row: str  # a | b | c | d | e
    encoder: str
    mode: str  # frozen | finetune
    head: str
    vocab: str  # train | candidates
    selection: str = "val"  # val (carved from train) | test (MEVF/QCR's code: best epoch on test, optimistic)
    epochs: int | None = None  # None: the recipe's
    features: str = "grid"  # grid (regions) | pooled (the encoder's pooled vector as one region)
    question: str = "gru"  # the question encoder: gru (GloVe + GRU) or a text tower (minilm, ...)
    extra: tuple[tuple[str, object], ...] = ()  # further TrainConfig fields (a recipe's own)
    tag: str = ""  # names a recipe in the run's name
    seed: int = 0  # the training seed and validation carve
    val_seed: int | None = None  # a validation carve other than the seed's (an ensemble member's)
    step: str = ""  # a transfer row: the change it makes to the previous step (not part of its name)
    gpu_sized: bool = False  # hours on 2 CPU cores: run only when --only names it (benchmarks/gpu.sh does)
    kind: str = "step"  # a transfer row: a step of the recipe, a "variant" (one change from the step `base`), or a
    #                     "control" (a step under the references' protocol: candidate list, epoch picked on test),
    #                     a "member" of an ensemble, or an "ensemble" of members on one validation carve, or a
    #                     "bagging" ensemble of members on different carves (built from their bundles, not trained)
    base: str = ""  # a variant: the step it changes one thing of
    members: tuple[str, ...] = ()  # an "ensemble": the names of its member runs (`medvqa ensemble`)
    continues: str = ""  # the shorter run down the same schedule whose checkpoint this one starts from, if made

    @property
    def config(self) -> str:
        """The run's name without its seed: what the seeds of one row share."""
        suffix = "-pooled" if self.features == "pooled" else ""
        suffix += "-test-selected" if self.selection == "test" else ""
        if self.epochs:
            suffix += f"-{self.epochs}of{self.schedule_epochs}ep" if self.schedule_epochs else f"-{self.epochs}ep"
        suffix += f"-q{self.question}" if self.question != "gru" else ""
        suffix += f"-{self.tag}" if self.tag else ""
        return f"{self.row}-{self.head}-{self.mode}-{self.vocab}{suffix}"

    @property
    def schedule_epochs(self) -> int | None:
        """A run stopped partway down a longer schedule: that schedule's length (its `epochs` are the first ones)."""
        return dict(self.extra).get("schedule_epochs")

    @property
    def name(self) -> str:
        return self.config + (f"-seed{self.seed}" if self.seed else "") + (
            f"-val{self.val_seed}" if self.val_seed is not None else "")



@dataclass(frozen=True)
class HeadRecipe:
    """What every VQA run shares; measured on VQA-RAD (mevf-ban, MedPix CNN, train-only vocabulary):
    hidden 512 + softmax cross-entropy reached 57.6 overall at ~9 s/epoch on 2 cores, hidden 1024 + BCE
    (MEVF's) 54.8 at ~30 s/epoch."""

    hidden: int = 512
    loss: str = "ce"
    lr: float = 3e-3
    epochs: int = 20
    finetune_epochs: int = 12
    threads: int = 2
    device: str = "auto"



def all_runs(mevf: Path, medpix: Path, untrained: Path, heads, vocabs, finetune: bool,
          paper_schedule: bool = True, lite0: tuple[Path, Path] | None = None,
          transfer: list[tuple[str, list[Run]]] = ()) -> list[Run]:
    """Frozen runs first (minutes each), then MEVF's end-to-end fine-tuning (the slowest, ~2.5 min/epoch
    on 2 cores); `paper_schedule` adds its 20-epoch runs (off for --quick); `lite0` (ImageNet, untrained
    folders) adds rows d/e, grid and pooled."""
    runs = [run for _, seeded in transfer for run in seeded]
    for vocab in vocabs:
        for head in heads:
            runs.append(Run("a", str(mevf / "encoder"), "frozen", head, vocab))
            runs.append(Run("b", str(medpix / "encoder"), "frozen", head, vocab))
            runs.append(Run("c", str(untrained), "frozen", head, vocab))
    for vocab in vocabs[:1] if lite0 else ():  # the honest protocol's train-only vocabulary
        for head in (h for h in heads if h in IMAGENET_HEADS):
            for features in ("grid", "pooled"):
                runs.append(Run("d", str(lite0[0]), "frozen", head, vocab, features=features))
                runs.append(Run("e", str(lite0[1]), "frozen", head, vocab, features=features))
    if finetune:  # MEVF's end-to-end fine-tuning, at the paper's 20 epochs (~1-2 h on 2 cores each)
        runs += [Run("a", str(mevf / "encoder"), "finetune", "mevf-ban", vocab,
                     epochs=PAPER_EPOCHS if paper_schedule else None) for vocab in vocabs]
    # MEVF's own protocol (all of train, epoch picked on test) measures what that choice is worth.
    runs.append(Run("a", str(mevf / "encoder"), "frozen", "mevf-ban", vocabs[-1], selection="test"))
    if finetune:
        runs.append(Run("a", str(mevf / "encoder"), "finetune", "mevf-ban", vocabs[-1], selection="test",
                        epochs=PAPER_EPOCHS if paper_schedule else None))
    if finetune and paper_schedule:  # both references on their released code's schedules, each seed (run when named)
        for seed in SEEDS:
            runs.append(Run("a", str(mevf / "encoder"), "finetune", "qcr", "train", epochs=QCR_EPOCHS, seed=seed,
                            extra=QCR_SCHEDULE, tag="qcr-schedule", gpu_sized=True))
            control = Run("a", str(mevf / "encoder"), "finetune", "qcr", "candidates", selection="test", seed=seed,
                          extra=QCR_SCHEDULE, tag="qcr-schedule", gpu_sized=True)
            partial = ""  # each stretch of the control starts from the checkpoint of the one before
            for first in QCR_FIRST_EPOCHS:
                runs.append(dataclasses.replace(control, epochs=first, continues=partial,
                                                extra=QCR_SCHEDULE + (("schedule_epochs", QCR_EPOCHS),)))
                partial = runs[-1].name
            runs.append(dataclasses.replace(control, epochs=QCR_EPOCHS, continues=partial))
            runs += [Run("a", str(mevf / "encoder"), "finetune", "mevf-ban", vocab, selection=selection, seed=seed,
                         epochs=PAPER_EPOCHS, extra=MEVF_SCHEDULE, tag="mevf-schedule", gpu_sized=True)
                     for vocab, selection in (("train", "val"), ("candidates", "test"))]
    return runs


# QCR's published schedule, as its released code (Awenbocc/med-vqa, main.py and train.py) runs it: 200 epochs of
# Adamax at PyTorch's default rate, 0.002 (main.py's --lr 0.005 never reaches the optimizer), held constant: no
# warmup, no decay; batch 64, hidden 1024, the gradient norm clipped at 0.25, MAML + autoencoder fine-tuned end to
# end (autoencoder loss x 0.001). Its loss is PyTorch's default BCE, averaged over every (question, answer) pair of
# each branch, not MEVF's sum over answers: Adamax ignores the scale, but the 0.25 clip does not (under the sum it
# clipped every step of a first start: gradient norms 4-990), nor does the weight of the autoencoder's loss beside
# it. Its type classifier is trained apart and frozen, so here the router's loss stops at the question features.
# On 2 CPU cores an epoch takes 86 s here (its reference code: 169 s), about 5 h a run: gpu.sh runs it, or --only
# over several calls, each resuming from the run's checkpoint.
QCR_EPOCHS = 200
# The control's first epochs alone, as far as 2 CPU cores train in one sitting (60 epochs in ~100 min, each 30 more in
# ~50): with the rate held constant they are exactly the full run's first epochs, so their best test accuracy is a
# lower bound of the full control's. Each stretch continues from the one before, and the full run from the last.
QCR_FIRST_EPOCHS = (60, 90, 120)
QCR_SCHEDULE_NOTE = ("QCR's schedule as its released code runs it: Adamax at 0.002 held constant, batch 64, hidden "
                     "1024, per-answer BCE averaged over each branch's (question, answer) pairs, the gradient norm "
                     "clipped at 0.25, the image side fine-tuned end to end, the type router trained apart from the "
                     "question encoder")
QCR_SCHEDULE = (("lr", 0.002), ("warmup_epochs", 0.0), ("lr_schedule", "constant"), ("batch_size", 64),
                ("loss", "bce-mean"), ("question_dim", 1024),
                ("head_args", (("hidden_dim", 1024), ("separate_router", True))))
# MEVF's, as its released code (aioz-ai/MICCAI19-MedVQA, main.py, train.py, trainer.py) runs it: 20 epochs of Adamax
# from --lr 0.005 on BAN's epoch-wise schedule (--lr-schedule mevf-step), batch 32, hidden 1024, the gradient norm
# clipped at 0.25; its loss is BCE summed over answers and divided by the batch (our bce), and that division takes
# the autoencoder's loss (x 0.001) with it, so the autoencoder weighs 0.001 / 32. Its questions are read through
# BAN's 600-d word embedding, released beside the weights (GloVe beside tf-idf-weighted GloVe, both halves trained;
# `medvqa import mevf` writes it as glove_tfidf_600d.txt). About 50 min a run on 2 CPU cores.
MEVF_SCHEDULE_NOTE = ("MEVF's schedule as its released code runs it: Adamax from 0.005, the rate x0.5, 1, 1.5 and 2 over "
                      "the first four epochs, then x0.75 at epochs 11, 13, 15, 17 and 19, batch 32, hidden 1024, "
                      "per-answer BCE summed over answers, the gradient norm clipped at 0.25, the autoencoder's loss "
                      "x 0.001 / 32, and its released 600-d word embedding (GloVe beside tf-idf-weighted GloVe)")
MEVF_SCHEDULE = (("lr", 0.005), ("warmup_epochs", 0.0), ("lr_schedule", "mevf-step"), ("batch_size", 32),
                 ("loss", "bce"), ("question_dim", 1024), ("clip_norm", 0.25), ("aux_weight", 0.001 / 32),
                 ("word_vectors", "glove_tfidf_600d.txt"), ("embed_dim", 600), ("head_args", (("hidden_dim", 1024),)))
# a run's tag -> the mark its row carries in the table and the note the mark points to
RELEASED_SCHEDULES = {"qcr-schedule": ("¶", QCR_SCHEDULE_NOTE), "mevf-schedule": ("‖", MEVF_SCHEDULE_NOTE)}


SEEDS = (0, 1, 2)  # every transfer row is the mean over these seeds (training order and validation carve)
MEMBER_SEEDS = (10, 20)  # an ensemble of a step: its seed's run and these training seeds on the same carve
BAGGING_STEP = ("bagging: an ensemble of 3 runs of the step on the 3 validation carves (seeds 0, 1, 2, plus 0, 10 or "
                "20), which together have trained on all of train; calibrated on each member's own validation answers "
                "(medvqa ensemble --bagging)")
BAGGING_ALL_STEP = ("bagging all nine: the three runs of each carve together, calibrated as bagging (one ensemble: "
                    "the nine runs make no second)")
# Three bagging ensembles of nine bf16 runs of step 4 (three per carve), no member shared: the training seeds added to
# the carve's for each ensemble (0 is the bf16 variant's own run of that carve).
BF16_BAGGING_OFFSETS = ((0, 10, 20), (30, 40, 50), (60, 70, 80))
BF16_BAGGING_STEP = ("bagging nine bf16 runs: the step under --precision bf16, three runs of each carve (training "
                     "seeds 0-20, 30-50 or 60-80 added to the carve's), three ensembles with no member shared")
ENSEMBLE_STEP = ("an ensemble of 3: the step's run and two more training seeds on its validation carve "
                 "(--val-seed), the answer distributions averaged and calibrated on that carve (medvqa ensemble)")
FINETUNE_LAST = 5  # the fine-tuning variant of step 4 trains the image tower in its last epochs only
FINETUNE_WARM_START = (("freeze_epochs", PAPER_EPOCHS - FINETUNE_LAST), ("augment", True))
MINILM_TUNED = (("question_lr", 5e-5),)  # MiniLM fine-tuned at a BERT-style rate under a fresh head
TRANSFORMER = (("head_args", (("hidden_dim", 256), ("layers", 2), ("attention_heads", 4))), ("optimizer", "adamw"),
               ("lr", 5e-4), ("weight_decay", 0.01))


def transfer_steps(lite0: Path, medpix_lite0: Path, untrained_lite0: Path) -> list[tuple[str, list[Run]]]:
    """The transfer recipe built one change at a time, each step three seeds (frozen image side, train-only
    vocabulary, epoch chosen on validation); then other image sides under its first step's head, one change each;
    then the references' protocol (candidate list, epoch picked on test) on its best step, as a labelled control."""
    first = dict(encoder=str(lite0), head="mevf-ban")
    transformer = dict(encoder=str(lite0), head="fusion-transformer", question="minilm",
                       extra=MINILM_TUNED + TRANSFORMER, tag="tf")
    routed = {**transformer, "head": "fusion-transformer-qcr", "tag": "tfqcr"}
    steps = [("EfficientNet-Lite0 ImageNet weights, frozen; mevf-ban; GloVe + GRU", first),
             ("+ MiniLM as the question encoder (fine-tuned, lr 5e-5)",
              dict(encoder=str(lite0), head="mevf-ban", question="minilm", extra=MINILM_TUNED)),
             ("+ the cross-modal transformer head (fusion-transformer, AdamW 5e-4)", transformer),
             ("+ QCR's closed/open router: each type its own answer classifier (fusion-transformer-qcr)", routed)]
    bf16 = {**routed, "extra": routed["extra"] + (("precision", "bf16"),), "tag": "tfqcr-bf16"}
    variants = [(steps[0][0], "EfficientNet-Lite0 without its ImageNet weights (random, seed 0): what the ImageNet "
                              "start buys", {**first, "encoder": str(untrained_lite0), "tag": "untrained"}),
                (steps[0][0], "EfficientNet-Lite2 ImageNet weights (260 px, a 9x9 grid)",
                 {**first, "encoder": LITE2, "tag": "lite2"}),
                (steps[0][0], "8 augmented views of each training image in the feature cache (--feature-views 8)",
                 {**first, "extra": (("feature_views", 8),), "tag": "views8"}),
                (steps[0][0], "EfficientNet-Lite0 CLIP-pretrained on MedPix 2.0 from ImageNet (MiniLM frozen, LiT)",
                 {**first, "encoder": str(medpix_lite0), "tag": "medpix"}),
                # MEVF's and QCR's other heads on the step's features: each head's best bundle for the confidence
                # table is then one made on the recipe's image side, with trust scores.
                (steps[0][0], "mevf-san in place of mevf-ban (MEVF's stacked attention over the 7x7 grid)",
                 {**first, "head": "mevf-san"}),
                (steps[0][0], "qcr in place of mevf-ban (QCR's closed/open router and question-conditioned reasoning)",
                 {**first, "head": "qcr"}),
                (steps[3][0], "an exponential moving average of the weights (--ema-decay 0.995) is scored and kept",
                 {**routed, "extra": routed["extra"] + (("ema_decay", 0.995),), "tag": "tfqcr-ema"}),
                (steps[3][0], "trained again from its seed on train + validation for the epochs validation chose, the "
                              "schedule stopped there (--refit; calibration the validation run's)",
                 {**routed, "extra": routed["extra"] + (("refit", True),), "tag": "tfqcr-refit"}),
                # The first 15 epochs train as the step's do (the same cached features, carve, batch order and
                # schedule); the last 5 train the image tower through too (several times an epoch's time on CPU).
                (steps[3][0], f"EfficientNet-Lite0 fine-tuned end to end in the last {FINETUNE_LAST} of the 20 epochs, "
                              "augmented, at the head's rate (--encoder-mode finetune --freeze-epochs "
                              f"{PAPER_EPOCHS - FINETUNE_LAST} --augment)",
                 {**routed, "mode": "finetune", "epochs": PAPER_EPOCHS, "tag": f"tfqcr-ft{FINETUNE_LAST}",
                  "extra": routed["extra"] + FINETUNE_WARM_START}),
                # The same with the encoder's BatchNorm statistics kept as pretrained: the variant above lost 7-10
                # validation points at its first fine-tuned epoch, the statistics re-estimated on augmented batches.
                (steps[3][0], f"EfficientNet-Lite0 fine-tuned in the last {FINETUNE_LAST} epochs as above, its "
                              "BatchNorm statistics kept as pretrained (--encoder-norm frozen)",
                 {**routed, "mode": "finetune", "epochs": PAPER_EPOCHS, "tag": f"tfqcr-ft{FINETUNE_LAST}-bnfrozen",
                  "extra": routed["extra"] + FINETUNE_WARM_START + (("encoder_norm", "frozen"),)}),
                # bf16 autocast on a CPU with AVX512-BF16 (this machine kind): does the step learn as well in it?
                # (benchmarks/head_precision.py measures the epoch time, side by side)
                (steps[3][0], "trained under bf16 autocast (--precision bf16), the weights and optimizer kept in fp32",
                 bf16)]
    controls = [("+ the cross-modal transformer head: the references' protocol*",
                 {**transformer, "vocab": "candidates", "selection": "test"})]
    seeded = [("step", "", what, kw) for what, kw in steps] + [("variant", base, what, kw) for base, what, kw in variants]
    seeded += [("control", "", what, kw) for what, kw in controls]
    rows = [(what, [Run("t", **{"mode": "frozen", "vocab": "train", **kw}, seed=seed, step=what, kind=kind, base=base)
                    for seed in SEEDS])
            for kind, base, what, kw in seeded]
    def member(kw: dict, carve: int, offset: int) -> Run:
        """One more run of step 4's configuration `kw` on the validation carve `carve`, training seed carve + offset."""
        return Run("t", **{"mode": "frozen", "vocab": "train", **kw}, seed=carve + offset, val_seed=carve,
                   step=steps[3][0], kind="member", base=steps[3][0])

    def ensemble(kw: dict, tag: str, kind: str, step: str, members: list[Run], seed: int = 0) -> Run:
        """An ensemble (`kind`) of `members`, runs of step 4's configuration `kw`, named by `tag` and `seed`."""
        return Run("t", **{"mode": "frozen", "vocab": "train", **kw, "tag": f"{kw['tag']}-{tag}"}, seed=seed,
                   step=step, kind=kind, base=steps[3][0], members=tuple(run.name for run in members))

    # An ensemble of step 4 per seed: two more training seeds on that seed's validation carve, and the seed's run
    # (last: the new members record their carve's settings, which `medvqa ensemble` reads from the first).
    ensembles = []
    for seed in SEEDS:
        members = [member(routed, seed, m) for m in MEMBER_SEEDS]
        own = next(run for run in rows[3][1] if run.seed == seed)
        ensembles += members + [ensemble(routed, f"ensemble{len(members) + 1}", "ensemble", ENSEMBLE_STEP,
                                         members + [own], seed)]
    # Bagging ensembles: one run of each validation carve, from the same pool of nine (the step's seeds, then the
    # runs of each added training seed).
    for j, offset in enumerate((0,) + MEMBER_SEEDS):
        pool = rows[3][1] if offset == 0 else [run for run in ensembles if run.kind == "member"
                                                                         and run.seed - run.val_seed == offset]
        ensembles.append(ensemble(routed, f"bagging{len(pool)}", "bagging", BAGGING_STEP, pool, j))
    # All nine in one bagging ensemble: does averaging three runs per carve add to one per carve?
    nine = rows[3][1] + [run for run in ensembles if run.kind == "member"]
    ensembles.append(ensemble(routed, f"bagging{len(nine)}", "bagging", BAGGING_ALL_STEP, nine))
    # Is bagging nine above PubMedCLIP's 72.1 as a mean over ensembles, not one point? Trained in bf16 (1.4x faster
    # an epoch here, the same accuracy as fp32 within the seeds' spread); each carve's first run is the variant's own.
    own = next(group for _, group in rows if group[0].tag == bf16["tag"])
    for k, offsets in enumerate(BF16_BAGGING_OFFSETS):
        nine = [run if offset == 0 else member(bf16, run.seed, offset) for offset in offsets for run in own]
        ensembles += [run for run in nine if run.kind == "member"]
        ensembles.append(ensemble(bf16, "bagging9", "bagging", BF16_BAGGING_STEP, nine, k))
    return rows + [(ENSEMBLE_STEP, ensembles)]
