"""GISP refuses more steps than the model has prunable structures (each step cuts at least one): once it
ran for hours (an ETA of 13 h on a tiny model) without a word. Refused before the weights are read when
the model is a local folder (from config.json alone), else before any calibration data is read."""

import re

import pytest

from gisp_plugin.cli import main
from gisp_plugin.methods.gisp import GispOptions, check_options
from gisp_plugin.pruning import run_method
from tests.tiny import tiny_folder, tiny_model

MESSAGE = re.compile(
    r"steps=(\d+) is more than the (\d+) structures gisp may prune in this model "
    r"\(each step cuts at least one\); give -o steps=(\d+) or fewer"
)


def _anatomy(model):
    from gisp_plugin.adapters.api import adapter_for

    return adapter_for(model).anatomy(model)


def test_the_limit_is_the_number_of_prunable_structures():
    anatomy = _anatomy(tiny_model("llama"))
    with pytest.raises(ValueError) as err:
        check_options(anatomy, GispOptions(steps=10**6))
    limit = int(MESSAGE.search(str(err.value)).group(2))
    check_options(anatomy, GispOptions(steps=limit))  # at the limit: accepted
    with pytest.raises(ValueError, match=MESSAGE):
        check_options(anatomy, GispOptions(steps=limit + 1))
    check_options(anatomy, GispOptions(steps=limit + 1, protect="none"))  # the reference protects the last layer
    with pytest.raises(ValueError, match=MESSAGE):
        check_options(anatomy, GispOptions(steps=limit + 1, blocks="attention"))  # only the heads count then


def test_prune_refuses_before_reading_the_weights(tmp_path, tokenizer, capsys):
    folder = tiny_folder(tmp_path, "llama", tokenizer)[0]
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # any attempt to load would fail on this file instead
    out = tmp_path / "out"
    capsys.readouterr()  # what saving the folder printed
    args = ["--method", "gisp", "--sparsity", "0.3", "-o", "steps=100000", "--out", str(out)]
    code = main(["prune", "--model", str(folder), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("gisp prune: error: steps=100000 is more than the ") and MESSAGE.search(err[0])
    assert not out.exists()


def test_run_method_refuses_before_reading_calibration_data():
    model = tiny_model("llama")  # the default calibration (c4 from the hub) cannot be read offline: not reached
    with pytest.raises(ValueError, match=MESSAGE):
        next(run_method(model, None, "gisp", [0.3], {"steps": "100000"}))
