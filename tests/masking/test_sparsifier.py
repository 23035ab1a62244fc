"""Masks are torch.ao.pruning parametrizations, including on biases of Linear layers fed 3-D input."""

import torch
from torch.ao.pruning import BaseSparsifier
from torch.ao.pruning._experimental.pruner import FakeStructuredSparsity
from torch.nn.utils import parametrize

from gisp_plugin.adapters.api import adapter_for
from gisp_plugin.anatomy.structures import KeepMask
from gisp_plugin.masking.sparsifier import StructureSparsifier, dense_tensor
from tests.tiny import tiny_model


def test_sparsifier_is_a_torch_sparsifier_with_row_and_column_parametrizations():
    model = tiny_model("qwen2")
    anatomy = adapter_for(model).anatomy(model)
    sparsifier = StructureSparsifier(anatomy)
    assert isinstance(sparsifier, BaseSparsifier)
    sparsifier.prepare(model)
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.q_proj.parametrizations.weight[0], FakeStructuredSparsity)
    assert isinstance(attn.q_proj.parametrizations.bias[0], FakeStructuredSparsity)
    assert isinstance(attn.o_proj.parametrizations.weight[0], FakeStructuredSparsity)
    assert attn.q_proj.parametrizations.weight[0].mask.shape == (48, 1)  # rows
    assert attn.o_proj.parametrizations.weight[0].mask.shape == (1, 48)  # columns
    sparsifier.restore_dense()
    assert not parametrize.is_parametrized(attn.q_proj)


def test_masked_bias_rows_are_zero_on_3d_input():
    """torch's BiasHook would reshape the bias in the conv layout; our bias parametrization must not."""
    model = tiny_model("qwen2")
    anatomy = adapter_for(model).anatomy(model)
    sparsifier = StructureSparsifier(anatomy)
    sparsifier.prepare(model)
    keep = KeepMask.dense(anatomy)
    flags = torch.ones(6, dtype=torch.bool)
    flags[[1, 4]] = False
    keep[0, "attn_head"] = flags
    sparsifier.apply(keep)
    q_proj = model.model.layers[0].self_attn.q_proj
    out = q_proj(torch.randn(2, 5, 48))  # [batch, seq, hidden]
    per_head = out.reshape(2, 5, 6, 8)
    assert torch.count_nonzero(per_head[:, :, [1, 4]]) == 0
    assert torch.count_nonzero(per_head[:, :, [0, 2, 3, 5]]) == per_head[:, :, [0, 2, 3, 5]].numel()
    expected = torch.nn.functional.linear(torch.ones(1, 48), dense_tensor(q_proj, "weight"), dense_tensor(q_proj, "bias"))
    got = q_proj(torch.ones(1, 48))
    torch.testing.assert_close(got.reshape(6, 8)[[0, 2, 3, 5]], expected.reshape(6, 8)[[0, 2, 3, 5]])
    sparsifier.restore_dense()
