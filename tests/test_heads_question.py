"""heads question side: GloVe loading (text and .npy), embedding init, and a Hugging Face text tower as the
question encoder (`encoders.TextQuestionEncoder`)."""
from __future__ import annotations

import json
import logging
import warnings

import numpy as np
import pytest
import torch

from encoders.text import TextQuestionEncoder, load_pretrained_text
from heads import (
    QuestionEncoder,
    QuestionEncoderConfig,
    create_head,
    head_from_dict,
    head_to_dict,
    load_glove,
)

WORDS = ["<pad>", "<unk>", "is", "there", "Lesion", "zebra"]


def write_glove(path, header: bool = False) -> None:
    lines = ["3 4"] if header else []
    lines += ["there 0.5 0.6 0.7 0.8", "is 0.1 0.2 0.3 0.4", "lesion 1 2 3 4", "other 9 9 9 9"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.mark.parametrize("header", [False, True])
def test_load_glove_text(tmp_path, caplog, header):
    path = tmp_path / "glove.4d.txt"
    write_glove(path, header)
    with caplog.at_level(logging.INFO, logger="heads.question"):
        matrix = load_glove(path, WORDS, 4, seed=7)
    assert matrix.shape == (6, 4) and matrix.dtype == torch.float32
    torch.testing.assert_close(matrix[2], torch.tensor([0.1, 0.2, 0.3, 0.4]))
    torch.testing.assert_close(matrix[3], torch.tensor([0.5, 0.6, 0.7, 0.8]))
    torch.testing.assert_close(matrix[4], torch.tensor([1.0, 2.0, 3.0, 4.0]))  # found lower-cased
    assert matrix[5].abs().max() < 1.0 and matrix[5].abs().sum() > 0  # missing: small, random
    torch.testing.assert_close(load_glove(path, WORDS, 4, seed=7), matrix)  # seeded
    assert not torch.equal(load_glove(path, WORDS, 4, seed=8)[5], matrix[5])
    assert "3/6 words found" in caplog.text


def test_load_glove_rejects_wrong_dimension(tmp_path):
    path = tmp_path / "glove.txt"
    path.write_text("is 0.1 0.2\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"glove.txt:1: word 'is' has 2 values, expected 4"):
        load_glove(path, WORDS, 4)
    with pytest.raises(FileNotFoundError):
        load_glove(tmp_path / "missing.txt", WORDS, 4)


def test_load_glove_npy(tmp_path):
    table = np.arange(24, dtype=np.float64).reshape(6, 4) + 1
    table[5] = 0.0  # an all-zero row is a word the table did not cover
    np.save(tmp_path / "glove.npy", table)
    matrix = load_glove(tmp_path / "glove.npy", WORDS, 4)
    torch.testing.assert_close(matrix[:5], torch.from_numpy(table[:5]).float())
    assert matrix[5].abs().sum() > 0
    with pytest.raises(ValueError, match="aligned with the vocabulary"):
        load_glove(tmp_path / "glove.npy", WORDS[:4], 4)


def test_init_embeddings(tmp_path):
    encoder = QuestionEncoder(QuestionEncoderConfig(vocab_size=6, embed_dim=4, hidden_dim=8))
    write_glove(tmp_path / "g.txt")
    matrix = load_glove(tmp_path / "g.txt", WORDS, 4)
    encoder.init_embeddings(matrix, freeze=True)
    assert not encoder.embedding.weight.requires_grad and encoder.config.freeze_embeddings
    assert (encoder.embedding.weight[0] == 0).all()  # padding row
    torch.testing.assert_close(encoder.embedding.weight[2:].detach(), matrix[2:])
    rebuilt = QuestionEncoder(encoder.config)
    assert not rebuilt.embedding.weight.requires_grad
    with pytest.raises(ValueError, match="expected"):
        encoder.init_embeddings(torch.zeros(5, 4))


# --- Hugging Face text towers, built tiny and offline --------------------------------------

def tiny_text_model(kind: str):
    import transformers

    common = dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, max_position_embeddings=16)
    if kind == "clip":
        return transformers.CLIPTextModel(transformers.CLIPTextConfig(**common, bos_token_id=1, eos_token_id=2))
    return transformers.BertModel(transformers.BertConfig(**common))


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    folders = {}
    for kind in ("clip", "bert"):
        folder = tmp_path_factory.mktemp(kind)
        tiny_text_model(kind).save_pretrained(folder)
        folders[kind] = folder
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "is", "there", "a", "lesion", "?"]
    (folders["bert"] / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    transformers.BertTokenizerFast(vocab_file=str(folders["bert"] / "vocab.txt")).save_pretrained(folders["bert"])
    return folders


def text_encoder(folder, **kw) -> TextQuestionEncoder:
    pooling = kw.pop("pooling", None)
    return TextQuestionEncoder(load_pretrained_text(str(folder), pooling=pooling), **kw)


@pytest.mark.parametrize("kind", ["clip", "bert"])
def test_hf_text_encoder_forward_and_padding(hf_folders, kind):
    encoder = text_encoder(hf_folders[kind], output_dim=12).eval()
    assert encoder.output_dim == 12
    tokens = torch.tensor([[3, 5, 6, 7, 2, 0, 0], [3, 8, 2, 0, 0, 0, 0]])
    lengths = torch.tensor([5, 3])
    out = encoder(tokens, lengths)
    assert out["tokens"].shape == (2, 7, 12) and out["pooled"].shape == (2, 12)
    junk = torch.where(torch.arange(9) < lengths[:, None], torch.cat([tokens, tokens[:, :2]], 1), 9)
    again = encoder(junk, lengths)
    torch.testing.assert_close(again["pooled"], out["pooled"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again["tokens"][:, :7], out["tokens"], rtol=1e-5, atol=1e-5)


class _TokensOf(torch.nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, tokens, lengths):
        return self.encoder(tokens, lengths)["tokens"]


@pytest.mark.parametrize("kind", ["clip", "bert"])
def test_hf_text_encoder_runs_the_tower_on_the_longest_question_only(hf_folders, kind):
    encoder = text_encoder(hf_folders[kind]).eval()
    widths = []
    encoder.tower.model.register_forward_pre_hook(lambda m, a, kw: widths.append(kw["input_ids"].shape[1]),
                                                  with_kwargs=True)
    tokens, lengths = torch.tensor([[3, 5, 6, 7, 2, 0, 0, 0], [3, 8, 2, 0, 0, 0, 0, 0]]), torch.tensor([5, 3])
    with torch.no_grad():
        out = encoder(tokens, lengths)
        mask = (torch.arange(8) < lengths[:, None]).long()
        full = encoder.tower(tokens, mask)  # the whole padded width, as before the cut
    assert widths == [5, 8]
    assert out["tokens"].shape == (2, 8, full["tokens"].shape[-1]) and not out["tokens"][0, 5:].any()
    real = mask.bool()
    torch.testing.assert_close(out["tokens"][real], full["tokens"][real], rtol=1e-5, atol=1e-5)
    if kind == "bert":  # mean pooling over the real tokens; CLIP's EOS is read from the lengths
        torch.testing.assert_close(out["pooled"], full["pooled"], rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(out["pooled"], full["tokens"][torch.arange(2), lengths - 1], rtol=1e-5, atol=1e-5)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace is deprecated, but the ONNX export still traces
        torch.jit.trace(_TokensOf(encoder), (tokens, lengths), check_trace=False)
    assert widths[-1] == 8  # a trace keeps the full width, so the graph serves any question length


def test_hf_text_encoder_tokenize(hf_folders):
    encoder = text_encoder(hf_folders["bert"], pooling="cls")
    tokens, lengths = encoder.tokenize(["is there a lesion?", "lesion"], max_length=8)
    assert tokens.shape == (2, 8) and lengths.tolist() == [7, 3]  # [CLS] ... [SEP]
    assert encoder(tokens, lengths)["pooled"].shape == (2, 16)


def test_hf_text_encoder_frozen_stays_in_eval(hf_folders):
    encoder = text_encoder(hf_folders["clip"], freeze=True, output_dim=8)
    encoder.train()
    assert not encoder.tower.training and encoder.proj.training
    assert not any(p.requires_grad for p in encoder.tower.parameters())


def test_head_over_hf_text_round_trips_offline(hf_folders):
    encoder = text_encoder(hf_folders["clip"])
    head = create_head("mevf-ban", feature_dim=10, vocab_sizes={"answers": 5}, question_encoder=encoder, hidden_dim=16)
    features = {"grid": torch.randn(2, 3, 10), "pooled": torch.randn(2, 10)}
    tokens, lengths = torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0]]), torch.tensor([4, 3])
    out = head(features, tokens, lengths)
    out["logits"].sum().backward()
    assert out["logits"].shape == (2, 5) and out["attention"].shape == (2, 3)
    spec = json.loads(json.dumps(head_to_dict(head)))
    assert spec["question_encoder"]["type"] == "module"
    spec["question_encoder"]["config"]["tower"]["source"] = "not/on-disk"  # the rebuild must not need it
    rebuilt = head_from_dict(spec, TextQuestionEncoder.from_config(spec["question_encoder"]["config"]))
    rebuilt.load_state_dict(head.state_dict(), strict=True)
    head.eval(), rebuilt.eval()
    torch.testing.assert_close(rebuilt(features, tokens, lengths)["logits"], head(features, tokens, lengths)["logits"])


@pytest.mark.parametrize("rnn, bidirectional, layers", [("gru", False, 1), ("gru", True, 2), ("lstm", True, 1)])
def test_pooled_vector_is_the_rnns_final_state(rnn, bidirectional, layers):
    # read from the output sequence (so the graph exports to ONNX), it must equal the state the RNN ends in
    from torch.nn.utils.rnn import pack_padded_sequence

    torch.manual_seed(0)
    encoder = QuestionEncoder(QuestionEncoderConfig(vocab_size=30, embed_dim=8, hidden_dim=16, rnn=rnn,
                                                    bidirectional=bidirectional, num_layers=layers)).eval()
    tokens, lengths = torch.randint(1, 30, (5, 9)), torch.tensor([9, 1, 4, 0, 6])
    with torch.no_grad():
        pooled = encoder(tokens, lengths)["pooled"]
        packed = pack_padded_sequence(encoder.embedding(tokens), lengths.clamp(1), batch_first=True,
                                      enforce_sorted=False)
        state = encoder.rnn(packed)[1]
        hidden = state[0] if rnn == "lstm" else state
    expected = torch.cat([hidden[-2], hidden[-1]], -1) if bidirectional else hidden[-1]
    assert torch.equal(pooled, expected)
