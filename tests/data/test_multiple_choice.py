"""The cmqa mixture: lm-eval formatting, option-only loss masks, polarity, equal token budget, calibration part only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gisp_plugin.data.api import CalibrationRequest
from gisp_plugin.data.loading import load_calibration
from gisp_plugin.data.multiple_choice import TASKS, draw_questions, offline_pool, token_budget
from gisp_plugin.data.offline import read_arrow_rows, task_split

LM_EVAL_YAMLS = {
    "boolq": "super_glue/boolq/default.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
    "winogrande": "winogrande/default.yaml",
    "piqa": "piqa/piqa.yaml",
}


def offline_pools():
    return {task.name: (task, offline_pool(task)) for task in TASKS}


@pytest.mark.parametrize("task", TASKS, ids=lambda task: task.name)
def test_options_are_the_requests_lm_eval_builds_from_its_installed_task_yaml(task):
    """lm-eval's own ConfigurableTask, fed the same rows, must produce the same (context, continuation) pairs."""
    datasets = pytest.importorskip("datasets")
    import lm_eval
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    rows = offline_pool(task)[:25]
    lm_rows = [r | {"label": int(r["answer"]), "idx": i} for i, r in enumerate(rows)] if task.name == "boolq" else rows
    config = load_yaml(Path(lm_eval.__file__).parent / "tasks" / LM_EVAL_YAMLS[task.name])
    validation = datasets.Dataset.from_list(lm_rows)  # boolq: lm-eval reads the super_glue columns
    config["custom_dataset"] = lambda **kwargs: datasets.DatasetDict({"validation": validation})
    config.pop("training_split", None)
    config.pop("test_split", None)
    lm_task = ConfigurableTask(config=config)
    for doc, row in zip(lm_task.validation_docs(), rows, strict=True):
        requests = lm_task.construct_requests(doc=doc, ctx=lm_task.fewshot_context(doc, 0))
        question = task.question(row)
        assert [tuple(r.arguments) for r in requests] == list(question.options)
        gold = lm_task.doc_to_text(doc) if task.name == "winogrande" else lm_task.doc_to_target(doc)
        assert gold == question.gold


def test_offline_pools_are_the_calibration_part_only():
    for task in TASKS:
        rows = read_arrow_rows(task.offline_file)
        assert offline_pool(task) == [rows[i] for i in range(0, len(rows), 4)]
        assert len(offline_pool(task)) == len(task_split(len(rows), "calibration"))


def test_masks_cover_only_option_tokens_and_each_question_has_one_correct_option(tokenizer):
    request = CalibrationRequest("cmqa-offline", n_samples=24, seqlen=512, seed=0)
    drawn = draw_questions(offline_pools(), request, tokenizer)
    calibration = load_calibration(request, tokenizer)
    assert {item.task for item in drawn} == {task.name for task in TASKS}
    position = 0
    for item in drawn:
        polarities = calibration.polarity[position : position + len(item.sequences)]
        assert polarities.count(1) == 1 and polarities.count(-1) == len(item.sequences) - 1
        assert polarities.index(1) == item.question.gold
        for (context, continuation), scored in zip(item.question.options, item.sequences, strict=True):
            ids, mask = calibration.sequences[position], calibration.loss_masks[position]
            assert torch.equal(ids, scored.ids) and torch.equal(mask, scored.mask)
            assert scored.dropped == 0  # seqlen 512 fits every option here
            assert tokenizer.decode(ids[mask]) == continuation
            assert tokenizer.decode(ids[~mask]) == context.rstrip(" ")
            position += 1
    assert position == len(calibration)
    assert calibration.polarity.count(1) == len(drawn)
    assert set(calibration.polarity) == {1, -1}


def test_questions_come_from_the_calibration_part_and_never_from_the_evaluation_part(tokenizer):
    request = CalibrationRequest("cmqa-offline", n_samples=24, seqlen=512, seed=1)
    drawn = draw_questions(offline_pools(), request, tokenizer)
    for task in TASKS:
        rows = read_arrow_rows(task.offline_file)
        calibration_part = [task.question(rows[i]) for i in task_split(len(rows), "calibration")]
        evaluation_part = {task.question(rows[i]).options for i in task_split(len(rows), "evaluation")}
        assert not {q.options for q in calibration_part} & evaluation_part  # no formatted question is in both parts
        for item in (i for i in drawn if i.task == task.name):
            assert item.question in calibration_part
            assert item.question.options not in evaluation_part


def test_equal_token_budget_per_task(tokenizer):
    request = CalibrationRequest("cmqa-offline", n_samples=48, seqlen=256, seed=0)
    total, share = token_budget(request, len(TASKS))
    assert total == 48 * 256 and share == total // 7
    drawn = draw_questions(offline_pools(), request, tokenizer)
    for task in TASKS:
        items = [i for i in drawn if i.task == task.name]
        used = sum(i.tokens for i in items)
        largest = len(task.question(offline_pool(task)[0]).options) * request.seqlen  # a question costs at most this
        assert share - largest < used <= share, task.name


def test_mixture_is_deterministic_per_seed_and_named_and_noted(tokenizer):
    request = CalibrationRequest("cmqa-offline", n_samples=8, seqlen=128, seed=0)
    first, again = load_calibration(request, tokenizer), load_calibration(request, tokenizer)
    other = load_calibration(CalibrationRequest("cmqa-offline", n_samples=8, seqlen=128, seed=5), tokenizer)
    assert len(first) == len(again) and all(torch.equal(a, b) for a, b in zip(first.sequences, again.sequences, strict=True))
    assert [s.tolist() for s in first.sequences] != [s.tolist() for s in other.sequences]
    assert first.name == "cmqa-offline:8x128:seed0"
    assert "index % 4 == 0" in first.notes and "disjoint" in first.notes and "1024 split equally" in first.notes
    assert all(len(s) <= 128 for s in first.sequences)
