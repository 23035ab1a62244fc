"""GSM8K question/answer pairs: lm-eval prompt, loss on the answer tokens only, calibration part only."""

from __future__ import annotations

import torch

from gisp_plugin.data.api import CalibrationRequest
from gisp_plugin.data.gsm8k import GSM8K_OFFLINE_FILE, offline_problems, prompt_and_answer
from gisp_plugin.data.loading import load_calibration
from gisp_plugin.data.offline import read_request_docs, task_split


def test_offline_problems_are_the_calibration_part_of_the_1319():
    docs = read_request_docs(GSM8K_OFFLINE_FILE)
    assert len(docs) == 1319 and [d["id"] for d in docs] == list(range(1319))
    problems = offline_problems()
    assert problems == [docs[i] for i in task_split(1319, "calibration")] and len(problems) == 330


def test_masks_cover_only_answer_tokens(tokenizer):
    calibration = load_calibration(CalibrationRequest("gsm8k-offline", n_samples=6, seqlen=2048, seed=0), tokenizer)
    assert len(calibration) == 6 and calibration.polarity == [0] * 6
    calibration_questions = {d["question"]: d for d in offline_problems()}
    evaluation_questions = {read_request_docs(GSM8K_OFFLINE_FILE)[i]["question"] for i in task_split(1319, "evaluation")}
    for ids, mask in zip(calibration.sequences, calibration.loss_masks, strict=True):
        prompt = tokenizer.decode(ids[~mask])
        assert prompt.startswith("Question: ") and prompt.endswith("\nAnswer:")
        question = prompt[len("Question: ") : -len("\nAnswer:")]
        assert question in calibration_questions and question not in evaluation_questions
        expected_prompt, expected_answer = prompt_and_answer(calibration_questions[question])
        assert prompt == expected_prompt
        assert tokenizer.decode(ids[mask]) == expected_answer and "####" in expected_answer
        assert not mask[: int((~mask).sum())].any()  # the answer is one block at the end


def test_pairs_are_deterministic_per_seed_and_fit_seqlen(tokenizer):
    request = CalibrationRequest("gsm8k-offline", n_samples=5, seqlen=64, seed=0)
    first, again = load_calibration(request, tokenizer), load_calibration(request, tokenizer)
    other = load_calibration(CalibrationRequest("gsm8k-offline", n_samples=5, seqlen=64, seed=1), tokenizer)
    assert all(torch.equal(a, b) for a, b in zip(first.sequences, again.sequences, strict=True))
    assert [s.tolist() for s in first.sequences] != [s.tolist() for s in other.sequences]
    for ids, mask in zip(first.sequences, first.loss_masks, strict=True):
        assert len(ids) == 64 and int((~mask).sum()) >= 32  # long answers keep half a window of question
    assert first.name == "gsm8k-offline:5x64:seed0"
    assert "index % 4 == 0" in first.notes and "answer tokens only" in first.notes
