"""Loading calibration data by data-source name.

A name is either a registered data source (``lambada-novels``, ``c4``, ``cmqa-offline``, ...) or
``file:PATH`` for a local ``.txt`` / ``.jsonl`` file.
"""

from __future__ import annotations

from typing import Any

from gisp_plugin.data.api import CalibrationRequest, CalibrationSet, DataSource
from gisp_plugin.data.local_files import FILE_PREFIX, file_source
from gisp_plugin.plugins.manager import UnknownNameError, lookup


def data_source(name: str) -> DataSource:
    """The data source called ``name``, or ``file:PATH``; unknown names list the available ones."""
    if name.startswith(FILE_PREFIX):
        return file_source(name)
    try:
        return lookup("data source", name)
    except UnknownNameError as error:
        raise UnknownNameError(f"{error}; or {FILE_PREFIX}PATH for a local .txt or .jsonl file") from None


def load_calibration(request: CalibrationRequest, tokenizer: Any) -> CalibrationSet:
    """Draw the calibration set ``request`` describes from its named source."""
    return data_source(request.source).calibration(request, tokenizer)
