"""Weights that do not match their config.json are refused with the tensors named, never loaded with random parts.

Before this check, transformers initialised missing tensors at random (its report hidden without -v), and
`gisp prune` pruned, saved and reported such a model with exit 0.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from gisp_plugin.checkpoint.saving import CheckpointError, load_pruned
from gisp_plugin.cli import main
from gisp_plugin.models.loading import ModelLoadError, load_model
from tests.tiny import tiny_folder

WEIGHTS = "model.safetensors"


def _edit_config(folder, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _edit_weights(folder, edit) -> None:
    tensors = load_file(folder / WEIGHTS)
    edit(tensors)
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})


def _more_layers(folder) -> None:
    _edit_config(folder, num_hidden_layers=5)  # the weights hold 3


def _missing(folder) -> None:
    _edit_weights(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))


def _unexpected(folder) -> None:
    _edit_weights(folder, lambda t: t.update({"model.layers.9.extra.weight": torch.zeros(2)}))


def _shape(folder) -> None:
    _edit_config(folder, intermediate_size=40)  # the weights are 32 wide


CASES = {
    "more_layers": (_more_layers, "18 tensor(s) the config needs are missing from the weights (model.layers.{3,4}."),
    "missing": (_missing, "1 tensor(s) the config needs are missing from the weights (model.layers.1.mlp.up_proj.weight)"),
    "unexpected": (_unexpected, "1 tensor(s) in the weights have no place in the config (model.layers.9.extra.weight)"),
    "shape": (_shape, "model.layers.0.mlp.down_proj.weight is (48, 32) in the weights, (48, 40) by the config"),
}


@pytest.fixture
def broken(request, tmp_path, tokenizer):
    edit, message = CASES[request.param]
    folder = tiny_folder(tmp_path, "llama", tokenizer)[0]
    edit(folder)
    return folder, message


@pytest.mark.parametrize("broken", list(CASES), indirect=True)
def test_loading_names_every_mismatch(broken):
    folder, message = broken
    with pytest.raises(ModelLoadError) as err:
        load_model(str(folder))
    assert f"the weights in {str(folder)!r} do not match its config.json: " in str(err.value)
    assert message in str(err.value)
    assert str(err.value).endswith("restore the config.json that belongs to these weights (or the weights of this config)")


@pytest.mark.parametrize("broken", ["more_layers", "missing"], indirect=True)
def test_prune_refuses_a_mismatched_checkpoint_with_one_line_and_writes_nothing(broken, tmp_path, capsys):
    folder, message = broken
    out = tmp_path / "out"
    code = main(["prune", "--model", str(folder), "--method", "magnitude", "--sparsity", "0.3", "--out", str(out)])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]  # not the loading bar
    assert code == 2
    assert len(err) == 1 and err[0].startswith("gisp prune: error: the weights in ") and message in err[0]
    assert not out.exists()


def test_tied_weights_are_not_missing(tmp_path, tokenizer):
    folder = tiny_folder(tmp_path, "llama", tokenizer)[0]
    _edit_config(folder, tie_word_embeddings=True)
    _edit_weights(folder, lambda t: t.pop("lm_head.weight"))
    model, _ = load_model(str(folder))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("pruned")
    folder = tiny_folder(root, "llama", tokenizer)[0]
    out = root / "out"
    assert main(["prune", "--model", str(folder), "--method", "magnitude", "--sparsity", "0.3", "--out", str(out)]) == 0
    return out / "magnitude-s0.30"


def _copy(folder, tmp_path):
    import shutil

    return shutil.copytree(folder, tmp_path / folder.name)


def test_a_pruned_folder_whose_config_was_edited_is_refused(pruned, tmp_path):
    folder = _copy(pruned, tmp_path)
    _edit_config(folder, vocab_size=json.loads((folder / "config.json").read_text())["vocab_size"] + 8)
    with pytest.raises(CheckpointError) as err:
        load_pruned(folder)
    assert f"the weights in {str(folder)!r} do not match its config.json: " in str(err.value)
    assert "model.embed_tokens.weight" in str(err.value) and "have another shape than the config makes them" in str(err.value)


def test_a_pruned_folder_missing_a_tensor_is_refused(pruned, tmp_path):
    folder = _copy(pruned, tmp_path)
    _edit_weights(folder, lambda t: t.pop("model.layers.0.input_layernorm.weight"))
    with pytest.raises(CheckpointError, match=r"missing from the weights \(model\.layers\.0\.input_layernorm\.weight\)"):
        load_pruned(folder)
