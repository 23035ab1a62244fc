"""The Python API checks its inputs like the command line does, before any work (issue 11)."""

import pytest

import gisp_plugin
from gisp_plugin.harness.config import ConfigError
from gisp_plugin.inputs import InputError, check_device, check_int, check_output_folder
from gisp_plugin.methods.options import OptionError
from gisp_plugin.pruning import TargetError
from tests.tiny import tiny_model


def test_run_method_refuses_bad_arguments_before_pruning():
    model = tiny_model("llama")
    with pytest.raises(TargetError, match="must be numbers such as 0.2, got \\['0.2'\\]"):
        next(gisp_plugin.run_method(model, None, "magnitude", ["0.2"]))
    with pytest.raises(InputError, match="seed must be >= 0, got -1"):
        next(gisp_plugin.run_method(model, None, "magnitude", [0.2], seed=-1))
    with pytest.raises(TypeError, match="needs a transformers model"):
        next(gisp_plugin.run_method("smollm2-135m", None, "magnitude", [0.2]))
    with pytest.raises(OptionError, match="options for flap must be a mapping"):
        next(gisp_plugin.run_method(model, None, "flap", [0.2], options=["fluctuation=reference"]))
    assert [s.target for s in gisp_plugin.run_method(model, None, "magnitude", 0.2)] == [0.2]


def test_loaders_and_the_harness_check_their_arguments(tmp_path):
    with pytest.raises(InputError, match="unknown device 'gpu7'"):
        gisp_plugin.load_model("smollm2-135m", device="gpu7")
    with pytest.raises(InputError, match="unknown dtype 'int4'"):
        gisp_plugin.load_pruned(tmp_path, dtype="int4")
    with pytest.raises(ConfigError, match="the comparison mapping: n_samples must be a whole number"):
        gisp_plugin.run_comparison({"n_samples": "8"}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_shared_checks_name_the_value():
    assert check_int("steps", 3, 1) == 3
    with pytest.raises(InputError, match="steps must be a whole number, got True"):
        check_int("steps", True, 1)
    with pytest.raises(InputError, match="cannot run a model here"):
        check_device("meta")
    assert str(check_device("cpu")) == "cpu"


def test_output_folder_must_be_writable(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        check_output_folder(tmp_path / "f")
    assert check_output_folder(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()
