"""Zero-shot accuracy through lm-eval itself, on the model in memory.

The ``lm_eval`` evaluator wraps the live model (dense, masked or compacted) in lm-eval's ``HFLM`` and
calls ``lm_eval.simple_evaluate`` with lm-eval's own task definitions, so the numbers are the ones
lm-eval's command line gives for a saved folder. Offline (no hub access), the standard tasks run on
the local copies prepared by ``offline_data``: the same task YAMLs, only the data location swapped,
restricted to the evaluation part of each validation file.

Reported per task: ``acc[task]``, ``acc_norm[task]`` and their ``*_stderr`` where the task defines
them; for GSM8K ``exact_match_strict[gsm8k]`` and ``exact_match_flexible[gsm8k]``. ``mean_acc`` averages
the multiple-choice tasks, taking acc_norm where a task reports it and acc otherwise (the rule the
pruning papers' tables follow); generation tasks (GSM8K) are not part of it. ``mean_acc_stderr`` is its
standard error, the tasks' standard errors combined as independent: sqrt(sum se^2) / tasks.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from gisp_plugin.evaluation.api import EvalResult
from gisp_plugin.evaluation.offline_data import (
    OFFLINE_TASKS,
    SPLIT_NOTE,
    TaskDataUnavailableError,
    check_offline_tasks,
    prepare_offline_tasks,
)

log = logging.getLogger(__name__)

ZERO_SHOT_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
STANDARD_TASKS = (*ZERO_SHOT_TASKS, "gsm8k")
MEAN_RULE = "mean over multiple-choice tasks of acc_norm where the task reports it, else acc (GSM8K excluded)"
GSM8K_FILTERS = {"strict-match": "exact_match_strict", "flexible-extract": "exact_match_flexible"}


class UnknownTaskError(LookupError):
    """A task name lm-eval does not know."""


@dataclass
class LmEvalOptions:
    """Options of the ``lm_eval`` evaluator.

    ``tasks``: lm-eval task names (in a spec string joined with ``+``: ``tasks=boolq+piqa``).
    ``limit``: at most this many examples per task (the first ones; ``None`` for all).
    ``num_fewshot``: few-shot examples (``None``: the task's default, 0 for the zero-shot tasks, 5
    for GSM8K). ``batch_size``: lm-eval batch size. ``offline``: ``true`` uses the local task copies,
    ``false`` lm-eval's hub datasets, ``auto`` the local copies when the hub is unreachable or
    ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` is set. ``include_path``: a folder of extra task YAMLs.
    """

    tasks: tuple[str, ...] = ZERO_SHOT_TASKS
    limit: int | None = None
    num_fewshot: int | None = None
    batch_size: int = 8
    offline: Literal["auto", "true", "false"] = "auto"
    include_path: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str):
            self.tasks = tuple(t.strip() for t in self.tasks.replace("+", ",").split(",") if t.strip())
        if not self.tasks:
            raise ValueError("lm_eval needs at least one task")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 or none, got {self.limit}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.include_path is not None and not Path(self.include_path).is_dir():
            raise ValueError(f"include_path {self.include_path!r} is not a folder")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout_s: float = 2.0) -> bool:
    """Whether the Hugging Face Hub can be used: not switched off by env, and its host answers.

    The host is asked once per process: a comparison evaluates a dozen models, and a network that drops
    packets would cost the whole timeout each time.
    """
    if _env_flag("HF_HUB_OFFLINE") or _env_flag("HF_DATASETS_OFFLINE"):
        return False
    from huggingface_hub import constants

    return _host_answers(constants.ENDPOINT, timeout_s)


@lru_cache(maxsize=8)
def _host_answers(endpoint: str, timeout_s: float) -> bool:
    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def use_offline_data(offline: str) -> bool:
    if offline == "auto":
        reachable = hub_reachable()
        log.info("hub %s: %s task data", "reachable" if reachable else "unreachable", "hub" if reachable else "offline")
        return not reachable
    return offline == "true"


@lru_cache(maxsize=1)
def default_task_manager() -> Any:
    """lm-eval's TaskManager over its built-in tasks (indexing ~15k YAMLs takes seconds: built once)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def task_manager(tasks: tuple[str, ...], offline: bool, include_path: str | None) -> Any:
    """An lm-eval TaskManager that knows ``tasks`` (offline copies first), or a clear error."""
    from lm_eval.tasks import TaskManager

    extra = [include_path] if include_path else []
    if extra:  # tasks of the user's own folder need no defaults and no offline copies
        own = set(TaskManager(include_path=extra, include_defaults=False).all_tasks)
        others = tuple(t for t in tasks if t not in own)
    else:
        others = tasks
    if offline:
        try:
            check_offline_tasks(others)
        except TaskDataUnavailableError:
            _check_known(others, default_task_manager())  # a typo is "unknown", a real task "unavailable offline"
            raise
        paths = [str(prepare_offline_tasks(others))] if others else []
        return TaskManager(include_path=paths + extra, include_defaults=False)
    manager = TaskManager(include_path=extra, include_defaults=bool(others)) if extra else default_task_manager()
    _check_known(tasks, manager)
    return manager


def _check_known(tasks: tuple[str, ...], manager: Any) -> None:
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UnknownTaskError(
            f"unknown lm-eval task {unknown[0]!r}; standard tasks: {', '.join(STANDARD_TASKS)} "
            f"(lm-eval knows {len(manager.all_tasks)} names: `lm_eval ls tasks`)"
        )


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None  # lm-eval writes "N/A" for a stderr it could not compute


def summarize(results: dict[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
    """Flat metrics and a per-task table from ``simple_evaluate``'s results (leaf tasks; a group is its tasks)."""
    metrics: dict[str, float] = {}
    table: dict[str, Any] = {}
    mean_terms = []
    mean_errors: list[float | None] = []
    groups = results.get("group_subtasks", {})
    for task in (name for name in results["results"] if not groups.get(name)):
        raw = results["results"][task]
        row: dict[str, Any] = {"n": results.get("n-samples", {}).get(task, {}).get("effective")}
        for key, value in raw.items():
            metric, comma, filt = key.partition(",")
            number = _number(value)
            if not comma or number is None:  # "metric,filter" keys only (not alias, sample_len)
                continue
            if metric.startswith("exact_match"):
                base = GSM8K_FILTERS.get(filt, f"exact_match_{filt}")
                name = base + metric.removeprefix("exact_match")
            elif filt == "none":
                name = metric
            else:
                name = f"{metric}_{filt}"
            row[name] = number
            metrics[f"{name}[{task}]"] = number
        if "acc" in row:
            row["mean_uses"] = "acc_norm" if "acc_norm" in row else "acc"
            mean_terms.append(row[row["mean_uses"]])
            mean_errors.append(row.get(row["mean_uses"] + "_stderr"))
        table[task] = row
    if mean_terms:
        metrics["mean_acc"] = sum(mean_terms) / len(mean_terms)
        if all(e is not None for e in mean_errors):
            metrics["mean_acc_stderr"] = math.sqrt(sum(e * e for e in mean_errors)) / len(mean_errors)
    return metrics, table


def check_lm_eval(options: LmEvalOptions) -> None:
    """Every task name is known to lm-eval, and available offline when the hub is not (no model needed)."""
    task_manager(options.tasks, use_offline_data(options.offline), options.include_path)


def evaluate_lm_eval(model: Any, tokenizer: Any, options: LmEvalOptions) -> EvalResult:
    """The ``lm_eval`` evaluator: ``simple_evaluate`` on the in-memory model through ``HFLM``."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    offline = use_offline_data(options.offline)
    manager = task_manager(options.tasks, offline, options.include_path)
    was_training = model.training
    started = time.perf_counter()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=options.batch_size)
    try:
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(options.tasks),
            num_fewshot=options.num_fewshot,
            limit=options.limit,
            task_manager=manager,
            log_samples=False,
        )
    except (ConnectionError, FileNotFoundError) as err:
        raise TaskDataUnavailableError(
            f"data for lm-eval tasks {', '.join(options.tasks)} could not be loaded ({str(err).splitlines()[0]}); "
            f"without network use offline=true (tasks available offline: {', '.join(OFFLINE_TASKS)})"
        ) from err
    finally:
        model.train(was_training)
    elapsed = time.perf_counter() - started
    metrics, table = summarize(results)
    for task, row in table.items():
        row["data"] = SPLIT_NOTE if offline and task in OFFLINE_TASKS else "the task's own dataset (lm-eval or include_path)"
    log.info("lm_eval %s: %s (%.1f s)", ",".join(options.tasks), metrics, elapsed)
    return EvalResult(
        metrics=metrics,
        details={
            "evaluator": "lm_eval",
            "tasks": table,
            "limit": options.limit,
            "num_fewshot": options.num_fewshot,
            "batch_size": options.batch_size,
            "offline": offline,
            "mean_acc_rule": MEAN_RULE,
            "lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
            "elapsed_s": round(elapsed, 2),
        },
    )
