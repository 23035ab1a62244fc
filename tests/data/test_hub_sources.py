"""Sources that need the Hugging Face Hub: one clear error offline, and their code paths on local ``datasets`` objects."""

from __future__ import annotations

import os

import pytest
import torch

from gisp_plugin.data.api import CalibrationRequest
from gisp_plugin.data.gsm8k import offline_problems, qa_pairs
from gisp_plugin.data.hub import DatasetUnavailableError
from gisp_plugin.data.loading import data_source, load_calibration
from gisp_plugin.data.multiple_choice import TASKS, mixture, offline_pool
from gisp_plugin.data.windows import document_windows

offline_only = pytest.mark.skipif(os.environ.get("HF_HUB_OFFLINE") != "1", reason="checks the offline error (HF_HUB_OFFLINE=1)")

TEXT_ALTERNATIVES = ("lambada-novels", "boolq-wiki", "file:PATH")


@offline_only
@pytest.mark.parametrize(
    ("source", "dataset"),
    [
        ("c4", "allenai/c4"),
        ("wikitext2", "Salesforce/wikitext/wikitext-2-raw-v1"),
        ("ptb", "ptb-text-only/ptb_text_only/penn_treebank"),
    ],
)
def test_text_corpora_name_the_dataset_and_the_offline_alternatives(source, dataset, tokenizer):
    for attempt in (
        lambda: load_calibration(CalibrationRequest(source, n_samples=2, seqlen=16), tokenizer),
        lambda: data_source(source).text("evaluation"),
    ):
        with pytest.raises(DatasetUnavailableError) as error:
            attempt()
        message = str(error.value)
        assert f"data source {source!r}" in message and dataset in message
        assert all(alternative in message for alternative in TEXT_ALTERNATIVES)


@offline_only
@pytest.mark.parametrize(
    ("source", "dataset", "alternative"),
    [("cmqa", "google/boolq", "cmqa-offline"), ("gsm8k", "openai/gsm8k/main", "gsm8k-offline")],
)
def test_task_sources_name_the_dataset_and_their_offline_twin(source, dataset, alternative, tokenizer):
    with pytest.raises(DatasetUnavailableError) as error:
        load_calibration(CalibrationRequest(source, n_samples=2, seqlen=16), tokenizer)
    message = str(error.value)
    assert f"data source {source!r}" in message and dataset in message and alternative in message


def test_hub_pools_as_datasets_objects_give_the_same_sets_as_lists(tokenizer):
    """Online, pools are ``datasets.Dataset`` objects (lazy rows and columns); offline they are lists."""
    datasets = pytest.importorskip("datasets")
    request = CalibrationRequest("cmqa", n_samples=8, seqlen=64, seed=0)
    as_lists = mixture({t.name: (t, offline_pool(t)) for t in TASKS}, request, tokenizer, "")
    as_datasets = mixture({t.name: (t, datasets.Dataset.from_list(offline_pool(t))) for t in TASKS}, request, tokenizer, "")
    assert as_lists.polarity == as_datasets.polarity
    assert all(torch.equal(a, b) for a, b in zip(as_lists.sequences, as_datasets.sequences, strict=True))

    request = CalibrationRequest("gsm8k", n_samples=4, seqlen=64, seed=0)
    problems = [{"question": d["question"], "answer": d["answer"]} for d in offline_problems()]
    from_lists = qa_pairs(problems, request, tokenizer, "")
    from_rows = qa_pairs(datasets.Dataset.from_list(problems), request, tokenizer, "")
    assert all(torch.equal(a, b) for a, b in zip(from_lists.sequences, from_rows.sequences, strict=True))

    documents = [p["question"] for p in problems[:40]]
    column = datasets.Dataset.from_dict({"text": documents})["text"]
    from_list = document_windows(documents, tokenizer, 3, 32, seed=0)
    from_column = document_windows(column, tokenizer, 3, 32, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(from_list, from_column, strict=True))
