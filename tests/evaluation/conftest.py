"""A text data source registered only for the evaluation tests (no dependence on the real corpora)."""

from __future__ import annotations

import pytest

from gisp_plugin.data.api import DataSource
from gisp_plugin.plugins import hookimpl
from gisp_plugin.plugins.manager import get_plugin_manager
from tests.tiny import SAMPLE_TEXT

EVAL_TEXT = SAMPLE_TEXT * 4
TEST_SOURCE = "tiny-eval-text"


def _no_calibration(request, tokenizer):
    raise NotImplementedError("the test source is for evaluation only")


class _TestSources:
    @hookimpl
    def gisp_data_sources(self):
        texts = {"evaluation": EVAL_TEXT, "calibration": "not the evaluation text"}
        return [DataSource(TEST_SOURCE, "test text", "text", _no_calibration, texts.__getitem__)]


@pytest.fixture
def test_source():
    """Registers the text source ``tiny-eval-text`` for one test."""
    pm = get_plugin_manager()
    plugin = _TestSources()
    pm.register(plugin, name="evaluation-test-sources")
    try:
        yield TEST_SOURCE
    finally:
        pm.unregister(plugin)
