"""Wanda-sp: masks equal an independent re-computation, layer by layer on the pruned model."""

import pytest
import torch

from gisp_plugin.adapters.api import adapter_for
from gisp_plugin.data.api import CalibrationSet
from gisp_plugin.pruning import run_method
from tests.baselines.independent import calibration_ids, wanda_sp_reference
from tests.tiny import tiny_model


def pruned(keep, layer, kind) -> list[int]:
    return sorted((~keep[layer, kind]).nonzero().flatten().tolist())


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("sequential", [True, False])
def test_masks_match_independent_computation(family, sequential):
    model = tiny_model(family)
    ids = calibration_ids()
    calibration = CalibrationSet("ids", list(ids))
    anatomy = adapter_for(model).anatomy(model)
    (sub,) = run_method(model, None, "wanda_sp", [0.3], {"sequential": str(sequential)}, calibration=calibration)
    ratio = sub.info["ratio"]
    n_heads = round(ratio * anatomy.kind(0, "attn_head").count)
    n_channels = round(ratio * anatomy.kind(0, "mlp_channel").count)
    assert n_heads > 0 and n_channels > 0
    expected = wanda_sp_reference(model, ids, n_heads, n_channels, sequential=sequential)
    for i, (heads, channels) in enumerate(expected):
        assert pruned(sub.keep, i, "attn_head") == sorted(heads)
        assert pruned(sub.keep, i, "mlp_channel") == sorted(channels)


def test_sequential_mode_sees_the_pruned_layers():
    # Same ratio, different calibration inputs for layers > 0: on a random model the decisions differ somewhere.
    model = tiny_model("llama", layers=4, intermediate_size=64)
    calibration = CalibrationSet("ids", list(calibration_ids()))
    seq = next(iter(run_method(model, None, "wanda_sp", [0.5], {"sequential": "true"}, calibration=calibration)))
    dense = next(iter(run_method(model, None, "wanda_sp", [0.5], {"sequential": "false"}, calibration=calibration)))
    assert seq.info["ratio"] == dense.info["ratio"]
    for kind in ("attn_head", "mlp_channel"):
        assert torch.equal(seq.keep[0, kind], dense.keep[0, kind])  # layer 0 sees the same inputs
    assert seq.keep != dense.keep
    for param in model.parameters():  # the run leaves the model dense
        assert not hasattr(param, "original")
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
