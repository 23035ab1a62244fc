"""Loading Hugging Face datasets by name, with one clear error when that is impossible.

Real users calibrate on C4 / WikiText-2 / PTB / task train splits, which ``datasets`` downloads.
Offline (``HF_HUB_OFFLINE=1``, no network, a missing or script-only dataset) every failure becomes a
``DatasetUnavailableError`` that names the data source, the dataset and the offline alternatives.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

log = logging.getLogger(__name__)


class DatasetUnavailableError(OSError):
    """A data source whose Hugging Face dataset cannot be loaded here, with the offline alternatives
    (an ``OSError``: the data is unreachable from here, a problem the user fixes, exit status 2)."""


TRUE = {"1", "on", "yes", "true"}


def hub_offline() -> bool:
    """Whether huggingface_hub is in offline mode (set now in the environment, or when it was imported)."""
    import os

    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return env.strip().lower() in TRUE or constants.is_offline_mode()


def describe(path: str, name: str | None = None, split: str | None = None, data_files: Any = None) -> str:
    """``path[/name]`` plus the split or files, the way the error messages show a dataset."""
    text = path + (f"/{name}" if name else "")
    if data_files:
        text += f" (files {data_files})"
    elif split:
        text += f" (split {split!r})"
    return text


@lru_cache(maxsize=16)
def _load(path: str, name: str | None, split: str, data_files: tuple[tuple[str, str], ...] | None) -> Any:
    import datasets

    files = dict(data_files) if data_files else None
    return datasets.load_dataset(path, name, split=split, data_files=files)


def load_hub_dataset(
    source: str,
    path: str,
    name: str | None = None,
    *,
    split: str,
    data_files: dict[str, str] | None = None,
    alternatives: Sequence[str] = (),
    shown_as: str | None = None,
) -> Any:
    """``datasets.load_dataset(path, name, split=..., data_files=...)`` for data source ``source`` (cached per process).

    Any failure (offline mode, no network, a dataset that no longer loads with this ``datasets``)
    is re-raised as ``DatasetUnavailableError`` naming the dataset (``shown_as`` when given) and ``alternatives``.
    """
    files = tuple(sorted(data_files.items())) if data_files else None
    try:
        return _load(path, name, split, files)
    except Exception as error:  # datasets raises ConnectionError, OfflineModeIsEnabled, FileNotFoundError, RuntimeError, ...
        hint = f"; offline alternatives: {', '.join(alternatives)}" if alternatives else ""
        raise DatasetUnavailableError(
            f"data source {source!r} needs the Hugging Face dataset {shown_as or describe(path, name, split, data_files)}, "
            f"which could not be loaded ({type(error).__name__}: {error}){hint}"
        ) from error
