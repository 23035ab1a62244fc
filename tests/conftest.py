"""Shared fixtures: tiny random models per family, a tiny tokenizer, and the real SmolLM2 (cached)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network; hub errors come at once

from tests.tiny import SEPARATE_FAMILIES, tiny_model, tiny_tokenizer  # noqa: E402


@pytest.fixture(params=SEPARATE_FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def tiny(family):
    return tiny_model(family)


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (float32, CPU) and its tokenizer; converted from GGUF once."""
    from gisp_plugin.models.loading import load_model

    return load_model("smollm2-135m")
