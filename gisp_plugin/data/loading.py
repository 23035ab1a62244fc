"""Loading calibration data by data-source name."""

from __future__ import annotations

from typing import Any

from gisp_plugin.data.api import CalibrationRequest, CalibrationSet, DataSource
from gisp_plugin.plugins.manager import lookup


def data_source(name: str) -> DataSource:
    return lookup("data source", name)


def load_calibration(request: CalibrationRequest, tokenizer: Any) -> CalibrationSet:
    """Draw the calibration set ``request`` describes from its named source."""
    return data_source(request.source).calibration(request, tokenizer)
