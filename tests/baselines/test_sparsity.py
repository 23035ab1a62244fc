"""Every baseline reaches its target sparsity, counted the paper's way, and compacts to that size."""

import pytest

from gisp_plugin.adapters.api import adapter_for
from gisp_plugin.checkpoint.saving import count_params
from gisp_plugin.data.api import CalibrationSet
from gisp_plugin.plugins.manager import registered
from gisp_plugin.pruning import compact_subnetwork, run_method
from tests.baselines.independent import calibration_ids
from tests.tiny import tiny_model

CASES = [
    ("wanda_sp", {}),
    ("owl_sp", {}),
    ("owl_sp", {"sequential": "false", "spread": "0.2"}),
    ("flap", {}),
    ("flap", {"structure": "UL-UM"}),
    ("llm_pruner", {"layer_start": "0", "layer_end": "4"}),
    ("llm_pruner", {"layer_start": "0", "layer_end": "4", "head_unit": "query_head"}),
    ("slimgpt", {}),
    ("slimgpt", {"schedule": "uniform"}),
]


def test_baselines_come_from_the_entry_point_plugins():
    methods = registered("method")
    for name in ("wanda_sp", "flap", "llm_pruner", "owl_sp", "sleb", "blockpruner", "slimgpt"):
        assert methods[name].plugin == name  # the entry point's name, not a built-in module
        assert methods[name].item.run.__module__ == f"gisp_baselines.{name}"


@pytest.mark.parametrize("family", ["llama", "mistral"])
@pytest.mark.parametrize(("method", "options"), CASES)
def test_achieved_sparsity_matches_target_and_compacted_size(family, method, options):
    # 8 query heads and 256 MLP channels per layer: fine enough that every target is met within 2 points
    model = tiny_model(family, layers=4, intermediate_size=256)
    anatomy = adapter_for(model).anatomy(model)
    calibration = CalibrationSet("ids", list(calibration_ids(4)))
    subs = list(run_method(model, None, method, [0.2, 0.5], options, calibration=calibration))
    for sub in subs:
        assert sub.sparsity == pytest.approx(1 - anatomy.params_kept(sub.keep) / anatomy.dense_params)
        assert abs(sub.sparsity - sub.target) <= 0.02, (method, options, sub.target, sub.sparsity)
        compact, params = compact_subnetwork(model, sub)
        added_bias = sum(b.numel() for b in sub.extra_biases.values())  # FLAP's compensation biases are real parameters
        assert count_params(compact)["decoder"] == params["decoder"] == anatomy.params_kept(sub.keep) + added_bias
