"""Updated weights written into a model's dense tensors and given back exactly (``WeightSwap``)."""

import pytest
import torch

from gisp_plugin.masking.updated_weights import WeightSwap, updated_weights
from tests.tiny import tiny_model

O_PROJ = "model.layers.0.self_attn.o_proj.weight"
DOWN = "model.layers.1.mlp.down_proj.weight"


def test_writes_replace_earlier_updates_and_restore_gives_the_dense_model_back():
    model = tiny_model("llama", layers=2)
    dense = {name: p.detach().clone() for name, p in model.named_parameters()}
    swap = WeightSwap(model)
    new_o, new_down = torch.ones_like(dense[O_PROJ]), torch.full_like(dense[DOWN], 2.0)
    swap.write({O_PROJ: new_o, DOWN: new_down})
    assert torch.equal(model.get_parameter(O_PROJ), new_o) and torch.equal(model.get_parameter(DOWN), new_down)
    swap.write({DOWN: new_down * 3})  # o_proj no longer named: back to dense
    assert torch.equal(model.get_parameter(O_PROJ), dense[O_PROJ]) and torch.equal(model.get_parameter(DOWN), new_down * 3)
    swap.restore()
    for name, p in model.named_parameters():
        assert torch.equal(p, dense[name]), name


def test_bad_paths_and_shapes_are_refused_before_anything_is_written():
    model = tiny_model("llama", layers=2)
    dense = model.get_parameter(O_PROJ).detach().clone()
    shape = "updated weight model.layers.0.self_attn.o_proj.weight has shape"
    with pytest.raises(ValueError, match=shape), updated_weights(model, {O_PROJ: torch.ones(2, 2)}):
        pass
    with pytest.raises(ValueError, match="names model.layers.9.mlp.down_proj.weight, which is not a tensor"):
        WeightSwap(model).write({O_PROJ: torch.ones_like(dense), "model.layers.9.mlp.down_proj.weight": torch.ones(1)})
    assert torch.equal(model.get_parameter(O_PROJ), dense)
