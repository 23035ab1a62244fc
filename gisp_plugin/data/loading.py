"""Loading calibration data by data-source name.

A name is either a registered data source (``lambada-novels``, ``c4``, ``cmqa-offline``, ...) or
``file:PATH`` for a local ``.txt`` / ``.jsonl`` file.
"""

from __future__ import annotations

from typing import Any

from gisp_plugin.data.api import CalibrationRequest, CalibrationSet, DataSource
from gisp_plugin.data.hub import DatasetUnavailableError, hub_offline
from gisp_plugin.data.local_files import FILE_PREFIX, file_source
from gisp_plugin.plugins.manager import UnknownNameError, lookup, registered


def data_source(name: str) -> DataSource:
    """The data source called ``name``, or ``file:PATH``; unknown names list the available ones."""
    if name.startswith(FILE_PREFIX):
        return file_source(name)
    try:
        return lookup("data source", name)
    except UnknownNameError as error:
        raise UnknownNameError(f"{error}; or {FILE_PREFIX}PATH for a local .txt or .jsonl file") from None


def check_data_source(name: str) -> DataSource:
    """``data_source(name)``, refused at once when it reads a Hugging Face dataset and the Hub is offline
    (before any model is loaded, not minutes later when the data is drawn)."""
    source = data_source(name)
    if source.hub_dataset is not None and hub_offline():
        offline = sorted(n for n, entry in registered("data source").items() if entry.item.hub_dataset is None)
        raise DatasetUnavailableError(
            f"data source {name!r} reads the Hugging Face dataset {source.hub_dataset}, but the Hub is offline here "
            f"(HF_HUB_OFFLINE is set); give an offline source ({', '.join(offline)}) or {FILE_PREFIX}PATH"
        )
    return source


def load_calibration(request: CalibrationRequest, tokenizer: Any) -> CalibrationSet:
    """Draw the calibration set ``request`` describes from its named source."""
    return data_source(request.source).calibration(request, tokenizer)
