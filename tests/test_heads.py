"""heads: every registered head builds, runs forward + backward, ignores padding, round-trips its config."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

import heads
from heads import (
    CLOSED,
    MASKED_LOGIT,
    OPEN,
    AnswerLoss,
    MultipleChoiceLoss,
    QCRLoss,
    QuestionEncoder,
    QuestionEncoderConfig,
    create_head,
    get_head_class,
    head_from_dict,
    head_to_dict,
    list_heads,
    loss_for_head,
)

B, N, D, L, A, V, C = 4, 5, 24, 7, 11, 30, 4
CLOSED_MASK = [True] * 3 + [False] * 8
OPEN_MASK = [False] * 2 + [True] * 9  # answer 2 is in both groups


def tiny_kwargs(name: str) -> dict:
    kw = {"hidden_dim": 32}
    if get_head_class(name).needs_answer_groups:
        kw.update(closed_mask=CLOSED_MASK, open_mask=OPEN_MASK)
    if name == "qcr":
        kw.update(type_hidden=[16, 8])
    return kw


def tiny_head(name: str, seed: int = 0) -> heads.VQAHead:
    torch.manual_seed(seed)
    encoder = QuestionEncoderConfig(vocab_size=V, embed_dim=16, hidden_dim=32)
    return create_head(name, feature_dim=D, vocab_sizes={"answers": A}, question_encoder=encoder, **tiny_kwargs(name))


def batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([L, 3, 1, 5])
    tokens = torch.randint(2, V, (B, L), generator=g) * (torch.arange(L) < lengths[:, None])
    choice_lengths = torch.tensor([[3, 2, 1, 0]] * B)
    choice_tokens = torch.randint(2, V, (B, C, 3), generator=g) * (torch.arange(3) < choice_lengths[..., None])
    return {
        "features": {"grid": torch.randn(B, N, D, generator=g), "pooled": torch.randn(B, D, generator=g)},
        "tokens": tokens,
        "lengths": lengths,
        "choices": {"choice_tokens": choice_tokens, "choice_lengths": choice_lengths},
    }


def run(head: heads.VQAHead, b: dict) -> dict:
    extra = b["choices"] if head.needs_choices else {}
    return head(b["features"], b["tokens"], b["lengths"], **extra)


H = 32  # tiny_kwargs' hidden_dim; "fused" is the vector the answer classifier reads (trust scores)
EXPECTED_KEYS = {
    "mevf-ban": {"logits": (B, A), "attention": (B, N), "fused": (B, H)},
    "mevf-san": {"logits": (B, A), "attention": (B, N), "fused": (B, H)},
    "qcr": {"logits": (B, A), "closed_logits": (B, A), "open_logits": (B, A), "type_logits": (B, 2), "attention": (B, N),
            "fused": (B, H)},
    "mc-ban": {"logits": (B, C), "attention": (B, N)},
    "fusion-transformer": {"logits": (B, A), "attention": (B, N), "fused": (B, 2 * H)},
    "fusion-transformer-qcr": {"logits": (B, A), "closed_logits": (B, A), "open_logits": (B, A),
                               "type_logits": (B, 2), "attention": (B, N), "fused": (B, 2 * H)},
    "fusion-transformer-mc": {"logits": (B, C), "attention": (B, N)},
}


def test_registry_lists_every_head_and_rejects_unknown_names():
    assert list_heads() == sorted(EXPECTED_KEYS)
    assert list_heads("mevf-*") == ["mevf-ban", "mevf-san"]
    assert list_heads(trainable_only=False) == sorted([*EXPECTED_KEYS, "ensemble"])  # built, not trained
    with pytest.raises(ValueError, match="known heads: ensemble, fusion-transformer, fusion-transformer-mc, "
                                         "fusion-transformer-qcr, mc-ban, mevf-ban, mevf-san, qcr"):
        create_head("nope", feature_dim=D, vocab_sizes={"answers": A}, question_encoder=QuestionEncoderConfig(V))
    with pytest.raises(ValueError, match="no config fields"):
        create_head("mevf-ban", feature_dim=D, vocab_sizes={"answers": A}, question_encoder=QuestionEncoderConfig(V), bogus=1)
    with pytest.raises(ValueError, match="'answers'"):
        create_head("mevf-ban", feature_dim=D, vocab_sizes={"words": V}, question_encoder=QuestionEncoderConfig(V))


def test_mevf_defaults_match_the_paper():
    config = heads.get_head_class("mevf-ban").config_class()
    assert (config.hidden_dim, config.glimpses) == (1024, 2)
    assert heads.get_head_class("mevf-san").config_class().hops == 2
    enc = QuestionEncoderConfig(vocab_size=10)
    assert (enc.embed_dim, enc.hidden_dim, enc.rnn) == (300, 1024, "gru")


@pytest.mark.parametrize("name", sorted(EXPECTED_KEYS))
def test_forward_backward_shapes(name):
    head = tiny_head(name)
    out = run(head, batch())
    assert {k: tuple(v.shape) for k, v in out.items()} == EXPECTED_KEYS[name]
    assert head.has_fused_output == ("fused" in out) and not (head.needs_choices and head.has_fused_output)
    torch.testing.assert_close(out["attention"].sum(-1), torch.ones(B))
    assert (out["attention"] >= 0).all()
    targets = torch.tensor([0, 1, 2, 1])
    losses = loss_for_head(head)(out, targets, answer_type=torch.tensor([CLOSED, CLOSED, OPEN, OPEN]))
    assert losses["loss"].dim() == 0 and torch.isfinite(losses["loss"])
    losses["loss"].backward()
    missing = [n for n, p in head.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"


@pytest.mark.parametrize("name", sorted(EXPECTED_KEYS))
def test_bfloat16_autocast(name):
    head = tiny_head(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(head, batch())
        losses = loss_for_head(head)(out, torch.tensor([0, 1, 2, 1]), answer_type=torch.tensor([CLOSED, CLOSED, OPEN, OPEN]))
    assert out["attention"].dtype == torch.float32  # heatmaps stay exact
    torch.testing.assert_close(out["attention"].sum(-1), torch.ones(B))
    assert losses["loss"].dtype == torch.float32 and torch.isfinite(losses["loss"])
    losses["loss"].backward()


@pytest.mark.parametrize("name", sorted(EXPECTED_KEYS))
def test_padding_never_changes_the_output(name):
    head = tiny_head(name).eval()
    b = batch()
    ref = run(head, b)
    # Longer padding, filled with junk ids instead of 0: must be invisible.
    padded = dict(b)
    junk = torch.randint(2, V, (B, 5))
    padded["tokens"] = torch.cat([b["tokens"], junk], dim=1)
    valid = torch.arange(L + 5) < b["lengths"][:, None]
    padded["tokens"] = torch.where(valid, padded["tokens"], torch.randint(2, V, padded["tokens"].shape))
    choice = b["choices"]
    choice_valid = torch.arange(6) < choice["choice_lengths"][..., None]
    wide = torch.cat([choice["choice_tokens"], torch.zeros(B, C, 3, dtype=torch.long)], dim=-1)
    padded["choices"] = {
        "choice_tokens": torch.where(choice_valid, wide, torch.randint(2, V, wide.shape)),
        "choice_lengths": choice["choice_lengths"],
    }
    out = run(head, padded)
    for key in ref:
        keep = ref[key] > MASKED_LOGIT / 2  # absent choices: masked in both, compare the rest
        torch.testing.assert_close(out[key][keep], ref[key][keep], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rnn,bidirectional", [("gru", False), ("lstm", True)])
def test_question_encoder_padding_and_pooling(rnn, bidirectional):
    torch.manual_seed(0)
    enc = QuestionEncoder(QuestionEncoderConfig(V, embed_dim=8, hidden_dim=12, rnn=rnn, bidirectional=bidirectional)).eval()
    tokens = torch.tensor([[5, 6, 7, 0, 0], [8, 9, 0, 0, 0]])
    lengths = torch.tensor([3, 2])
    out = enc(tokens, lengths)
    assert out["tokens"].shape == (2, 5, 12) and out["pooled"].shape == (2, 12)
    assert (out["tokens"][0, 3:] == 0).all()
    longer = enc(torch.cat([tokens, torch.full((2, 4), 9)], dim=1), lengths)
    torch.testing.assert_close(longer["pooled"], out["pooled"])
    torch.testing.assert_close(longer["tokens"][:, :5], out["tokens"])
    alone = enc(tokens[1:, :2], lengths[1:])  # the same question in a batch of its own
    torch.testing.assert_close(alone["pooled"], out["pooled"][1:])
    if not bidirectional:  # pooled = the state after the last valid word
        torch.testing.assert_close(out["pooled"][0], out["tokens"][0, 2])


def test_qcr_routes_by_predicted_type():
    head = tiny_head("qcr").eval()
    forced = torch.tensor([[3.0, -3.0], [-3.0, 3.0], [1.0, 0.0], [0.0, 1.0]])  # CLOSED, OPEN, CLOSED, OPEN
    handle = head.type_classifier.register_forward_hook(lambda module, args, output: forced)
    out = run(head, batch())
    handle.remove()
    closed_rows, open_rows = [0, 2], [1, 3]
    torch.testing.assert_close(out["type_logits"], forced)
    torch.testing.assert_close(out["logits"][closed_rows], out["closed_logits"][closed_rows])
    torch.testing.assert_close(out["logits"][open_rows], out["open_logits"][open_rows])
    closed, opened = torch.tensor(CLOSED_MASK), torch.tensor(OPEN_MASK)
    assert (out["closed_logits"][:, ~closed] == MASKED_LOGIT).all()
    assert (out["open_logits"][:, ~opened] == MASKED_LOGIT).all()
    assert (out["closed_logits"][:, closed] > MASKED_LOGIT).all()
    assert closed[out["logits"][closed_rows].argmax(-1)].all()
    assert opened[out["logits"][open_rows].argmax(-1)].all()


def test_qcr_rejects_bad_masks():
    enc = QuestionEncoderConfig(V, embed_dim=8, hidden_dim=16)
    with pytest.raises(ValueError, match="11"):
        create_head("qcr", feature_dim=D, vocab_sizes={"answers": A}, question_encoder=enc, closed_mask=[1, 0], open_mask=OPEN_MASK)
    with pytest.raises(ValueError, match="separate_router must be true or false, got 'yes'"):
        create_head("qcr", feature_dim=D, vocab_sizes={"answers": A}, question_encoder=enc, closed_mask=CLOSED_MASK,
                    open_mask=OPEN_MASK, separate_router="yes")
    with pytest.raises(ValueError, match="selects no answer"):
        create_head("qcr", feature_dim=D, vocab_sizes={"answers": A}, question_encoder=enc, closed_mask=[0] * A, open_mask=OPEN_MASK)


@pytest.mark.parametrize("name", sorted(EXPECTED_KEYS))
def test_config_round_trip_gives_identical_outputs(name):
    head = tiny_head(name, seed=1).eval()
    spec = json.loads(json.dumps(head_to_dict(head)))
    rebuilt = head_from_dict(spec)
    rebuilt.load_state_dict(head.state_dict(), strict=True)
    rebuilt.eval()
    b = batch(seed=3)
    with torch.no_grad():
        for key, value in run(head, b).items():
            torch.testing.assert_close(run(rebuilt, b)[key], value, rtol=0, atol=0)
    # create_head with the config's own fields gives the same architecture too.
    again = create_head(
        name, feature_dim=D, vocab_sizes={"answers": A}, question_encoder=rebuilt.question_encoder,
        **dataclasses.asdict(head.config),
    )
    again.load_state_dict(head.state_dict(), strict=True)


def test_answer_loss_matches_mevf_scaling():
    logits = torch.randn(3, 5, requires_grad=True)
    index = torch.tensor([4, 0, 2])
    one_hot = F.one_hot(index, 5).float()
    bce = AnswerLoss("bce")
    expected = F.binary_cross_entropy_with_logits(logits, one_hot, reduction="sum") / 3
    torch.testing.assert_close(bce({"logits": logits}, index)["loss"], expected)
    torch.testing.assert_close(bce({"logits": logits}, one_hot)["loss"], expected)
    mean = AnswerLoss("bce-mean")  # QCR's code: PyTorch's default reduction, over every (question, answer) pair
    torch.testing.assert_close(mean({"logits": logits}, index)["loss"], expected * 3 / 15)
    ce = AnswerLoss("ce")
    torch.testing.assert_close(ce({"logits": logits}, one_hot)["loss"], F.cross_entropy(logits, index))
    # An answer outside the vocabulary (-100): zero target row for BCE, skipped by CE.
    unknown = torch.tensor([4, -100, 2])
    torch.testing.assert_close(ce({"logits": logits}, unknown)["loss"], F.cross_entropy(logits[[0, 2]], index[[0, 2]]))
    assert torch.isfinite(bce({"logits": logits}, unknown)["loss"])
    none = ce({"logits": logits}, torch.full((3,), -100))["loss"]  # no row with a target: 0, and it backpropagates
    none.backward()
    assert none.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))
    with pytest.raises(ValueError):
        AnswerLoss("mse")


@pytest.mark.parametrize("kind", ["bce", "bce-mean", "ce"])
def test_qcr_loss_trains_only_the_true_type_branch_within_its_group(kind):
    closed, opened = torch.tensor(CLOSED_MASK), torch.tensor(OPEN_MASK)
    closed_logits = torch.randn(4, A).masked_fill(~closed, MASKED_LOGIT).requires_grad_()
    open_logits = torch.randn(4, A).masked_fill(~opened, MASKED_LOGIT).requires_grad_()
    type_logits = torch.randn(4, 2, requires_grad=True)
    outputs = {"closed_logits": closed_logits, "open_logits": open_logits, "type_logits": type_logits}
    answer_type = torch.tensor([CLOSED, OPEN, CLOSED, OPEN])
    loss = QCRLoss(CLOSED_MASK, OPEN_MASK, type_weight=0.5, kind=kind)
    parts = loss(outputs, torch.tensor([0, 5, 1, 10]), answer_type)
    torch.testing.assert_close(parts["loss"], parts["answer_loss"] + 0.5 * parts["type_loss"])
    torch.testing.assert_close(parts["type_loss"], F.cross_entropy(type_logits, answer_type))
    parts["loss"].backward()
    assert (closed_logits.grad[[1, 3]] == 0).all() and (open_logits.grad[[0, 2]] == 0).all()
    assert (closed_logits.grad[:, ~closed] == 0).all() and (open_logits.grad[:, ~opened] == 0).all()
    assert closed_logits.grad[[0, 2]][:, closed].abs().sum() > 0
    if kind == "ce":  # the closed rows reduce to a 3-way softmax over the closed group
        expected = F.cross_entropy(closed_logits[[0, 2]][:, closed], torch.tensor([0, 1]))
        opened_part = F.cross_entropy(open_logits[[1, 3]][:, opened], torch.tensor([3, 8]))
        torch.testing.assert_close(parts["answer_loss"], (expected * 2 + opened_part * 2) / 4)
    if kind == "bce-mean":  # each branch's BCE averaged over its 2 questions x its group, the two averages added
        closed_part = F.binary_cross_entropy_with_logits(closed_logits[[0, 2]][:, closed], torch.eye(3)[[0, 1]])
        opened_part = F.binary_cross_entropy_with_logits(open_logits[[1, 3]][:, opened], torch.eye(9)[[3, 8]])
        torch.testing.assert_close(parts["answer_loss"], closed_part + opened_part)


def test_qcr_loss_averaged_over_pairs_takes_a_batch_of_one_type():
    closed = torch.tensor(CLOSED_MASK)
    outputs = {"closed_logits": torch.randn(2, A).masked_fill(~closed, MASKED_LOGIT),
               "open_logits": torch.randn(2, A), "type_logits": torch.randn(2, 2)}
    parts = QCRLoss(CLOSED_MASK, OPEN_MASK, kind="bce-mean")(outputs, torch.tensor([0, 2]), torch.tensor([CLOSED] * 2))
    expected = F.binary_cross_entropy_with_logits(outputs["closed_logits"][:, closed], torch.eye(3)[[0, 2]])
    torch.testing.assert_close(parts["answer_loss"], expected)  # no open question: that branch adds 0, not NaN


@pytest.mark.parametrize("split", [2, 3])
def test_qcr_branch_means_split_over_ranks_give_one_process_gradient(split):
    """QCR's per-branch means over the global batch: rank parts that pass the batch's types, each weighted by the
    engine's share (rank size x world / batch) and averaged as DDP does, give the one-process gradient."""
    from vqa.training import World, epoch_plan

    torch.manual_seed(0)
    logits = {k: torch.randn(4, A) for k in ("closed_logits", "open_logits", "type_logits")}
    logits["type_logits"] = logits["type_logits"][:, :2]
    targets, types = torch.tensor([0, 1, 2, 5]), torch.tensor([CLOSED, CLOSED, CLOSED, OPEN])
    loss = QCRLoss(CLOSED_MASK, OPEN_MASK, kind="bce-mean")
    assert loss.reads_batch_types and not QCRLoss(CLOSED_MASK, OPEN_MASK, kind="bce").reads_batch_types

    def grads(rows, **kw):
        outs = {k: v[rows].clone().requires_grad_() for k, v in logits.items()}
        part = loss(outs, targets[rows], types[rows], **kw)
        return part, outs

    whole, outs = grads(torch.arange(4))
    whole["loss"].backward()
    plain, _ = grads(torch.arange(4), batch_types=types)
    assert torch.equal(plain["loss"], whole["loss"])  # one process: the batch is its own, the loss bit for bit
    world = 2
    merged = {k: torch.zeros(4, v.shape[1]) for k, v in logits.items()}
    for rank, rows in enumerate((torch.arange(split), torch.arange(split, 4))):
        share = world * len(rows) / 4
        part, o = grads(rows, batch_types=types)
        (part["loss"] * share / world).backward()  # DDP averages the ranks' gradients
        for k in merged:
            merged[k][rows] = o[k].grad
    for k in merged:
        torch.testing.assert_close(merged[k], outs[k].grad)
    # without the batch's types a rank holding 2 of the 3 closed questions weighs them as if they were all
    local, o = grads(torch.arange(2))
    local["loss"].backward()
    assert not torch.allclose(o["closed_logits"].grad / world, outs["closed_logits"].grad[:2])
    plan = epoch_plan(10, 2, World(1, 1, 2), 0, 0)  # every rank's shard knows its global batch
    assert all(torch.equal(shard.whole[2:], shard.indices) and len(shard.whole) == 4 for (shard,) in plan)


@pytest.mark.parametrize("separate", [False, True])
def test_a_separate_qcr_router_does_not_train_the_question_encoder(separate):
    torch.manual_seed(0)
    encoder = QuestionEncoderConfig(vocab_size=V, embed_dim=16, hidden_dim=32)
    head = create_head("qcr", feature_dim=D, vocab_sizes={"answers": A}, question_encoder=encoder,
                       separate_router=separate, **tiny_kwargs("qcr"))
    F.cross_entropy(run(head, batch())["type_logits"], torch.tensor([CLOSED, OPEN, CLOSED, OPEN])).backward()
    reached = [p.grad is not None and p.grad.abs().sum() > 0 for p in head.question_encoder.parameters()]
    assert any(reached) != separate
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.type_classifier.parameters())


def test_multiple_choice_loss_is_cross_entropy():
    logits = torch.randn(3, 4)
    targets = torch.tensor([0, 3, 1])
    out = MultipleChoiceLoss()({"logits": logits}, targets)
    torch.testing.assert_close(out["loss"], F.cross_entropy(logits, targets))
    assert set(out) == {"loss", "choice_loss"}


def test_an_ensemble_of_routed_heads_averages_each_branch_and_routes_by_the_mean_type():
    from heads.ensemble import mean_answer_logits

    members = [tiny_head("qcr", seed) for seed in (1, 2, 3)]
    for member, bias in zip(members, ([3.0, -3.0], [-1.0, 1.0], [-1.0, 1.0])):  # closed at 0.998, then open twice
        last = member.type_classifier[-1]
        torch.nn.init.zeros_(last.weight)
        last.bias.data = torch.tensor(bias)
    encoder = QuestionEncoderConfig(vocab_size=V, embed_dim=16, hidden_dim=32)
    ensemble = create_head("ensemble", feature_dim=D, vocab_sizes={"answers": A}, question_encoder=encoder,
                           members=[head_to_dict(m) for m in members], score="softmax", route_by_mean_type=True)
    ensemble.load_member_states([m.state_dict() for m in members])
    # an ensemble built before (no route_by_mean_type in its config) answers as it was calibrated and exported
    spec = head_to_dict(ensemble)
    del spec["config"]["route_by_mean_type"]
    earlier = head_from_dict(spec)
    earlier.load_state_dict(ensemble.state_dict())
    for m in [*members, ensemble, earlier]:
        m.eval()
    b = batch()
    with torch.no_grad():
        outs, got, before = [run(m, b) for m in members], run(ensemble, b), run(earlier, b)
    assert [o["type_logits"].argmax(-1).tolist() for o in outs] == [[CLOSED] * B, [OPEN] * B, [OPEN] * B]
    assert got["type_logits"].argmax(-1).tolist() == [OPEN] * B  # mean closed probability (0.998 + 2 * 0.12) / 3
    columns = [torch.arange(A)] * 3
    expected = mean_answer_logits([o["open_logits"] for o in outs], columns, A)
    assert torch.allclose(got["logits"], expected) and torch.equal(got["open_logits"], got["logits"])
    assert (got["logits"][:, [i for i, o in enumerate(OPEN_MASK) if not o]] == MASKED_LOGIT).all()  # open answers only
    mixed = mean_answer_logits([o["logits"] for o in outs], columns, A)  # each member's own branch, averaged
    assert not torch.allclose(got["logits"], mixed) and torch.allclose(before["logits"], mixed)
    assert torch.allclose(got["closed_logits"], mean_answer_logits([o["closed_logits"] for o in outs], columns, A))
