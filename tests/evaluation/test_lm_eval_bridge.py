"""The lm-eval bridge gives exactly lm-eval's own numbers; offline tasks load and run; bad tasks fail clearly."""

from __future__ import annotations

import json
import random

import lm_eval
import pytest
import torch
from lm_eval.tasks import TaskManager

from gisp_plugin.adapters.api import adapter_for
from gisp_plugin.checkpoint.saving import save_pruned
from gisp_plugin.evaluation.lm_eval_bridge import LmEvalOptions, UnknownTaskError, evaluate_lm_eval
from gisp_plugin.evaluation.offline_data import TaskDataUnavailableError, offline_tasks_dir
from tests.tiny import random_keep, record_for, tiny_model, tiny_tokenizer

WORDS = ("structured", "pruning", "removes", "attention", "heads", "channels", "from", "a", "language", "model", "text")
TINY_TASK = """task: tiny_mc
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    validation: {data}
output_type: multiple_choice
validation_split: validation
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Offline task copies go to a test folder, shared by this module's tests."""
    monkeypatch.setenv("GISP_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "gisp-cache"))


@pytest.fixture(scope="module")
def compacted(tmp_path_factory):
    """A tiny compacted (pruned) model in memory and the same model saved as a folder."""
    model = tiny_model("mistral")
    adapter = adapter_for(model)
    anatomy = adapter.anatomy(model)
    keep = random_keep(anatomy, 1, 0.7)
    compact = adapter.compact(model, keep, {})
    record = record_for(compact, anatomy, keep)
    tokenizer = tiny_tokenizer()
    folder = save_pruned(compact, tokenizer, tmp_path_factory.mktemp("pruned") / "tiny", record)
    return compact, tokenizer, folder


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory):
    """A folder with a 16-question multiple-choice task on local JSONL data."""
    folder = tmp_path_factory.mktemp("tasks")
    rng = random.Random(0)
    rows = [
        {
            "question": " ".join(rng.sample(WORDS, 5)),
            "choices": [" ".join(rng.sample(WORDS, rng.randint(1, 3))) for _ in range(3)],
            "label": rng.randrange(3),
        }
        for _ in range(16)
    ]
    data = folder / "data.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in rows))
    (folder / "tiny_mc.yaml").write_text(TINY_TASK.format(data=data))
    return folder


def lm_eval_own_run(folder, tasks, include_path, limit=None):
    """lm-eval by itself: its ``hf`` model loads the saved folder (remote code), nothing of the bridge."""
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={folder},trust_remote_code=True,dtype=float32",
        tasks=tasks,
        limit=limit,
        batch_size=4,
        device="cpu",
        task_manager=TaskManager(include_path=str(include_path), include_defaults=False),
        log_samples=False,
    )
    return results["results"]


def test_bridge_equals_lm_evals_own_run_on_a_local_task(compacted, tiny_task):
    model, tokenizer, folder = compacted
    ours = evaluate_lm_eval(model, tokenizer, LmEvalOptions(tasks=("tiny_mc",), include_path=str(tiny_task), batch_size=4))
    own = lm_eval_own_run(folder, ["tiny_mc"], tiny_task)["tiny_mc"]
    for metric in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr"):
        assert ours.metrics[f"{metric}[tiny_mc]"] == own[f"{metric},none"], metric
    assert ours.metrics["mean_acc"] == own["acc_norm,none"]
    assert ours.details["tasks"]["tiny_mc"]["n"] == 16
    assert ours.details["tasks"]["tiny_mc"]["mean_uses"] == "acc_norm"


def test_offline_tasks_run_and_equal_lm_evals_own_run(compacted):
    model, tokenizer, folder = compacted
    options = LmEvalOptions(tasks=("boolq", "arc_easy"), limit=8, batch_size=4, offline="true")
    ours = evaluate_lm_eval(model, tokenizer, options)
    assert ours.details["offline"] is True
    assert "index % 4 != 0" in ours.details["tasks"]["boolq"]["data"]
    assert {"acc[boolq]", "acc[arc_easy]", "acc_norm[arc_easy]", "mean_acc"} <= set(ours.metrics)
    assert "acc_norm[boolq]" not in ours.metrics  # lm-eval's boolq defines acc only
    assert ours.metrics["mean_acc"] == pytest.approx((ours.metrics["acc[boolq]"] + ours.metrics["acc_norm[arc_easy]"]) / 2)
    assert ours.details["tasks"]["boolq"]["n"] == ours.details["tasks"]["arc_easy"]["n"] == 8
    own = lm_eval_own_run(folder, ["boolq", "arc_easy"], offline_tasks_dir(), limit=8)
    assert ours.metrics["acc[boolq]"] == own["boolq"]["acc,none"]
    assert ours.metrics["acc_norm[arc_easy]"] == own["arc_easy"]["acc_norm,none"]


def test_offline_yaml_only_swaps_the_data_location(compacted):
    import yaml

    evaluate_lm_eval(*compacted[:2], LmEvalOptions(tasks=("piqa",), limit=2, offline="true"))
    text = (offline_tasks_dir() / "piqa" / "piqa.yaml").read_text()
    config = yaml.safe_load(text)
    assert config["include"].endswith("lm_eval/tasks/piqa/piqa.yaml")
    allowed = {"include", "dataset_path", "dataset_name", "dataset_kwargs", "training_split", "validation_split"}
    assert set(config) <= allowed | {"test_split", "fewshot_split"}
    assert "doc_to_text" not in text and "doc_to_choice" not in text


def test_unknown_task_lists_the_standard_ones(compacted):
    with pytest.raises(UnknownTaskError, match=r"unknown lm-eval task 'boolqq'; standard tasks: boolq, piqa"):
        evaluate_lm_eval(*compacted[:2], LmEvalOptions(tasks=("boolqq",), offline="true"))


def test_task_without_offline_data_is_a_clear_error(compacted):
    expected = r"task 'lambada_openai' has no offline data; tasks available offline: boolq"
    with pytest.raises(TaskDataUnavailableError, match=expected):
        evaluate_lm_eval(*compacted[:2], LmEvalOptions(tasks=("arc_easy", "lambada_openai"), offline="true"))


def test_hub_data_unreachable_is_a_clear_error(compacted, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(TaskDataUnavailableError, match="could not be loaded .*without network use offline=true"):
        evaluate_lm_eval(*compacted[:2], LmEvalOptions(tasks=("arc_easy",), limit=2, offline="false"))


def test_auto_uses_offline_data_when_the_hub_is_switched_off(compacted, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = evaluate_lm_eval(*compacted[:2], LmEvalOptions(tasks=("winogrande",), limit=4, offline="auto"))
    assert result.details["offline"] is True
    assert result.details["tasks"]["winogrande"]["n"] == 4


def test_gsm8k_offline_reports_strict_and_flexible_exact_match(tokenizer):
    model = tiny_model("llama", max_position_embeddings=1024)
    with torch.no_grad():  # all logits 0, so greedy decoding picks token 0: make it end the answer at once
        model.model.norm.weight.zero_()
    model.generation_config.eos_token_id = 0
    options = LmEvalOptions(tasks=("gsm8k",), limit=2, num_fewshot=1, offline="true")
    result = evaluate_lm_eval(model, tokenizer, options)
    assert {"exact_match_strict[gsm8k]", "exact_match_flexible[gsm8k]"} <= set(result.metrics)
    assert result.metrics["exact_match_strict[gsm8k]"] == 0.0  # an empty answer has no "#### <number>"
    assert "mean_acc" not in result.metrics  # generation tasks are not averaged with accuracies
    assert result.details["tasks"]["gsm8k"]["n"] == 2


def test_batched_requests_give_the_results_of_one_at_a_time(compacted):
    """lm-eval's batching (the bridge's default batch_size) changes only float rounding, never an answer."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, tokenizer, _ = compacted
    rng = random.Random(1)
    pairs = [
        (" ".join(rng.sample(WORDS, rng.randint(1, 8))), " " + " ".join(rng.sample(WORDS, rng.randint(1, 4)))) for _ in range(24)
    ]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    one = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1).loglikelihood(requests, disable_tqdm=True)
    batched = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=LmEvalOptions().batch_size).loglikelihood(
        requests, disable_tqdm=True
    )
    assert [greedy for _, greedy in one] == [greedy for _, greedy in batched]
    assert [ll for ll, _ in batched] == pytest.approx([ll for ll, _ in one], rel=1e-5, abs=1e-5)

    options = {"tasks": ("boolq", "arc_easy"), "limit": 8, "offline": "true"}  # piqa's answers outgrow the tiny context
    one = evaluate_lm_eval(model, tokenizer, LmEvalOptions(**options, batch_size=1)).metrics
    batched = evaluate_lm_eval(model, tokenizer, LmEvalOptions(**options)).metrics
    assert one == batched  # accuracies and their stderrs, exactly
    assert batched["mean_acc_stderr"] == pytest.approx(
        (batched["acc_stderr[boolq]"] ** 2 + batched["acc_norm_stderr[arc_easy]"] ** 2) ** 0.5 / 2
    )
