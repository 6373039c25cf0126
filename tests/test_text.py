"""Answer normalisation, tokenisation, and the word and answer vocabularies."""
from __future__ import annotations

import json

import pytest

from vqa.answers import CANDIDATES, TRAIN_ONLY, AnswerVocab
from vqa.data import load_vqa_rad
from vqa.data.record import Record, canonical_question_type
from vqa.errors import DataError
from vqa.text import WordVocab, normalize_answer, tokenize

from .conftest import shared_data


@pytest.mark.parametrize("raw,expected", [
    ("Yes", "yes"), (" No. ", "no"), ("X-ray", "x-ray"), ("Two", "2"), ("the left kidney", "left kidney"),
    ("3.5 cm", "3.5 cm"), ("PA/AP", "pa/ap"), ("T2-weighted,  MRI", "t2-weighted mri"), (2, "2"),
    ("Right upper lobe.", "right upper lobe"), ("(CT)", "ct"),
    ("L5.", "l5"), ("5.", "5"), ("Size: .5 cm", "size .5 cm"),  # a dot is kept before a digit only
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected
    assert normalize_answer(expected) == expected  # idempotent


def test_tokenize():
    assert tokenize("Is there a mass in the patient's left lung?") == \
        ["is", "there", "a", "mass", "in", "the", "patient's", "left", "lung", "?"]
    assert tokenize("Is this an X-ray, T2-weighted or 3.5 cm?") == \
        ["is", "this", "an", "x-ray", ",", "t2-weighted", "or", "3.5", "cm", "?"]


def test_question_types_are_canonical_across_benchmarks():
    assert canonical_question_type("PRES, POS") == canonical_question_type("POS, PRES") == "position+presence"
    assert canonical_question_type("presence+position") == "position+presence"  # as a saved dataset holds it
    assert canonical_question_type("Quantity") == canonical_question_type("COUNT") == "count"
    assert canonical_question_type("ABN") == canonical_question_type("Abnormality") == "abnormality"
    assert canonical_question_type(None) == "unknown"


def test_word_vocab(tmp_path):
    vocab = WordVocab.build(["Is there a mass?", "Is there a cyst?", "Where is the mass?"], min_count=2)
    assert vocab.words[:2] == ["<pad>", "<unk>"] and "mass" in vocab.words and "cyst" not in vocab.words
    ids, length = vocab.encode("Is there a cyst?", max_len=6)
    assert length == 5 and len(ids) == 6 and ids[3] == WordVocab.UNK and ids[5] == WordVocab.PAD
    ids, length = vocab.encode("is " * 20, max_len=4)
    assert length == 4 and len(ids) == 4
    vocab.save(tmp_path / "vocab.json")
    assert WordVocab.load(tmp_path / "vocab.json").words == vocab.words
    (tmp_path / "bad.json").write_text(json.dumps({"words": ["a", "b"]}))
    with pytest.raises(DataError, match="must start with '<pad>', '<unk>'"):
        WordVocab.load(tmp_path / "bad.json")


def _rec(answer, answer_type):
    return Record("x.jpg", "q?", answer, answer_type, "other", split="train")


def test_answer_vocab_train_only(tmp_path):
    records = [_rec("yes", "CLOSED")] * 3 + [_rec("no", "CLOSED"), _rec("left", "OPEN"), _rec("left", "CLOSED"),
                                             _rec("ct", "OPEN")]
    vocab = AnswerVocab.from_records(records)
    assert vocab.protocol == TRAIN_ONLY
    assert vocab.answers[0] == "yes" and vocab.index("ct") >= 0 and vocab.index("mri") == -1
    assert vocab.type_mask("CLOSED") == [a in ("yes", "no", "left") for a in vocab.answers]
    assert vocab.type_mask("OPEN") == [a in ("left", "ct") for a in vocab.answers]
    assert vocab.coverage([_rec("ct", "OPEN"), _rec("mri", "OPEN")]) == 0.5
    vocab.save(tmp_path / "answers.json")
    assert AnswerVocab.load(tmp_path / "answers.json") == vocab
    assert len(AnswerVocab.from_records(records, min_count=2)) == 2
    with pytest.raises(DataError, match="duplicate answers"):
        AnswerVocab(["yes", "yes"])


def test_answer_vocab_from_candidates(tmp_path):
    (tmp_path / "cands.json").write_text(json.dumps(["Yes", "no", "CT", "brain"]))
    vocab = AnswerVocab.from_candidates(tmp_path / "cands.json", [_rec("yes", "CLOSED"), _rec("ct", "OPEN")])
    assert vocab.protocol == CANDIDATES and vocab.answers == ["yes", "no", "ct", "brain"]
    assert vocab.type_mask("CLOSED") == [True, True, False, True]  # 'no', 'brain' unseen: allowed in both
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DataError, match="non-empty JSON list"):
        AnswerVocab.from_candidates(tmp_path / "empty.json")


def test_real_vqa_rad_vocabularies():
    root = shared_data("vqa-rad")
    train, test = load_vqa_rad(root, "train"), load_vqa_rad(root, "test")
    own = AnswerVocab.from_records(train)
    mevf = AnswerVocab.from_candidates(root / "answer_all_list.json", train)
    # Written with the references' normalisation ('xray' for 'x-ray'), the list covers nearly all
    # training answers once mapped onto ours; on test both cover about 90% (the accuracy ceiling).
    assert own.coverage(train) == 1.0 and mevf.coverage(train) > 0.99
    assert mevf.coverage(test) > 0.88 and own.coverage(test) > 0.88
    assert len(mevf) <= 458


def test_questions_read_cut_are_counted_and_said(caplog):
    """MEVF's 12 words fit most of VQA-RAD's English; every character of a Chinese question is a token."""
    from vqa.batches import encode_questions

    questions = ["图像里包含的区域属于身体哪个部分?", "Is this a CT?"]
    records = [Record("x.jpg", q, "yes", "CLOSED", "other", split="train") for q in questions]
    vocab = WordVocab.build(questions)
    with caplog.at_level("WARNING", logger="vqa.batches"):
        encoded = encode_questions(records, [0, 0], vocab, None, max_len=12)
    assert encoded.lengths.tolist() == [12, 5]
    assert "1 of 2 questions have more than 12 tokens (up to 17) and are read cut" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="vqa.batches"):
        encode_questions(records, [0, 0], vocab, None, max_len=17)
    assert "read cut" not in caplog.text
