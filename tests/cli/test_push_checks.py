"""`gisp push` sends nothing unless the folder loads: weights, config, modelling file and tokenizer are
checked first (once only `pruning.json` was). Offline here, so a folder that passed every check would
stop at the offline error instead: the message tells which check refused it."""

import shutil

import pytest

from gisp_plugin.adapters.api import adapter_for
from gisp_plugin.checkpoint.saving import save_pruned
from gisp_plugin.cli import main
from tests.tiny import random_keep, record_for, tiny_model

OFFLINE = "the Hugging Face Hub is offline here"


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, tokenizer):
    model = tiny_model("llama")
    anatomy = adapter_for(model).anatomy(model)
    keep = random_keep(anatomy, 0, 0.6)
    compact = adapter_for(model).compact(model, keep, {})
    return save_pruned(compact, tokenizer, tmp_path_factory.mktemp("push") / "m", record_for(compact, anatomy, keep))


def _without(folder, tmp_path, *names):
    copy = shutil.copytree(folder, tmp_path / "m")
    for name in names:
        (copy / name).unlink()
    return copy


CASES = {
    "weights": (("model.safetensors",), "has no .safetensors weights"),
    "config": (("config.json",), "is not a model folder (no config.json in it)"),
    "modelling file": (("modeling_gisp_pruned.py",), "has no modeling_gisp_pruned.py, the modelling file its config.json names"),
    "tokenizer": (("tokenizer.json", "tokenizer_config.json"), "could not load the tokenizer in"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_folder_missing_a_piece_is_refused_before_anything_is_sent(pruned, tmp_path, monkeypatch, capsys, case):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    names, message = CASES[case]
    folder = _without(pruned, tmp_path, *names)
    capsys.readouterr()
    assert main(["push", str(folder), "me/tiny-pruned"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and err[0].startswith("gisp push: error: ") and message in err[0], err
    assert OFFLINE not in err[0]


def test_a_whole_folder_passes_the_checks(pruned, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["push", str(pruned), "me/tiny-pruned"]) == 2
    assert OFFLINE in capsys.readouterr().err  # it got as far as the network
