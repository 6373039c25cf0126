"""benchmarks/validation_shift.py: the versions of one VQA-RAD question are found as one source question."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from validation_shift import source_questions  # noqa: E402


def test_a_questions_frame_paraphrase_and_linked_entry_are_one_source_question(tmp_path):
    official = [
        {"image_name": "a.jpg", "question": "Is there a mass?", "question_frame": "Is/Are there a mass in the liver?",
         "question_rephrase": "Does the liver have a mass?", "qid_linked_id": "L1"},
        {"image_name": "a.jpg", "question": "Does the  liver have a MASS?", "question_frame": "NULL",
         "question_rephrase": "NULL", "qid_linked_id": "L1"},
        {"image_name": "a.jpg", "question": "Which side?", "question_frame": "NULL", "question_rephrase": "NULL",
         "qid_linked_id": "L2"},
        {"image_name": "b.jpg", "question": "Is there a mass?", "question_frame": "NULL", "question_rephrase": "NULL",
         "qid_linked_id": "L3"},  # the same words about another image: another question
        {"image_name": "b.jpg", "question": "Is it an MRI?", "question_frame": "NULL",
         "question_rephrase": "Was this imaged by MRI?", "qid_linked_id": "L4"},
        {"image_name": "b.jpg", "question": "Was this imaged by MRI?", "question_frame": "NULL",
         "question_rephrase": "NULL", "qid_linked_id": "L5"},  # linked by its wording alone
    ]
    path = tmp_path / "VQA_RAD_Dataset_Public.json"
    path.write_text(json.dumps(official))
    source = source_questions(path)
    mass = source[("a.jpg", "is there a mass?")]
    assert source[("a.jpg", "is/are there a mass in the liver?")] == mass
    assert source[("a.jpg", "does the liver have a mass?")] == mass  # case and spacing aside
    assert source[("a.jpg", "which side?")] != mass and source[("b.jpg", "is there a mass?")] != mass
    assert source[("b.jpg", "is it an mri?")] == source[("b.jpg", "was this imaged by mri?")]
    assert len(set(source.values())) == 4
