"""`gisp push` offline: one clear error and not a single connection attempted."""

import socket

import pytest

from gisp_plugin.adapters.api import adapter_for
from gisp_plugin.checkpoint.saving import save_pruned
from gisp_plugin.cli import main
from tests.tiny import random_keep, record_for, tiny_model


@pytest.fixture
def no_network(monkeypatch):
    """Every socket connection attempt is recorded and refused (a tripwire, not a fake Hub)."""
    attempts = []

    def refuse(self, address):
        attempts.append(address)
        raise OSError("network use in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


def test_push_offline_fails_clearly_and_sends_nothing(tmp_path, tokenizer, monkeypatch, no_network, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = tiny_model("llama")
    adapter = adapter_for(model)
    anatomy = adapter.anatomy(model)
    keep = random_keep(anatomy, 0, 0.6)
    compact = adapter.compact(model, keep, {})
    folder = save_pruned(compact, tokenizer, tmp_path / "m", record_for(compact, anatomy, keep))
    assert main(["push", str(folder), "me/tiny-pruned"]) == 2
    err = capsys.readouterr().err
    assert "the Hugging Face Hub is offline here (HF_HUB_OFFLINE is set), so nothing was sent" in err
    assert no_network == []


def test_push_refuses_a_folder_that_is_not_pruned(tmp_path, no_network, capsys):
    assert main(["push", str(tmp_path), "me/x"]) == 2
    assert "not a gisp-plugin pruned model" in capsys.readouterr().err
    assert no_network == []
