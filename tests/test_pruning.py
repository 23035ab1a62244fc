"""The shared pruning loop: target checks, nesting, determinism, and a dense model left untouched."""

import pytest
import torch

from gisp_plugin.adapters.api import adapter_for
from gisp_plugin.checkpoint.trajectory import Trajectory
from gisp_plugin.methods.options import OptionError
from gisp_plugin.plugins.manager import UnknownNameError
from gisp_plugin.pruning import TargetError, compact_subnetwork, run_method
from tests.tiny import random_ids, tiny_model


@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_targets_are_hit_and_nested(tiny, method):
    anatomy = adapter_for(tiny).anatomy(tiny)
    trajectory = Trajectory()
    subnetworks = list(run_method(tiny, None, method, [0.5, 0.2, 0.35], trajectory=trajectory))
    assert [s.target for s in subnetworks] == [0.2, 0.35, 0.5]
    largest_unit = max(k.params_per_unit for layer in anatomy.layers for k in layer.kinds.values())
    for s in subnetworks:
        assert abs(s.sparsity - s.target) <= largest_unit / anatomy.dense_params
    assert subnetworks[2].keep.is_subset_of(subnetworks[1].keep) and subnetworks[1].keep.is_subset_of(subnetworks[0].keep)
    assert len(trajectory.steps) == 3 and trajectory.keep_at(1) == subnetworks[1].keep


def test_random_is_seeded():
    model = tiny_model("llama")
    a = next(run_method(model, None, "random", [0.3], seed=1)).keep
    b = next(run_method(model, None, "random", [0.3], seed=1)).keep
    c = next(run_method(model, None, "random", [0.3], seed=2)).keep
    assert a == b and a != c


def test_magnitude_prunes_the_smallest_structures():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.gate_proj.weight[5].mul_(1e-3)
        model.model.layers[1].mlp.up_proj.weight[5].mul_(1e-3)
        model.model.layers[1].mlp.down_proj.weight[:, 5].mul_(1e-3)
    anatomy = adapter_for(model).anatomy(model)
    one_channel = anatomy.kind(1, "mlp_channel").params_per_unit / anatomy.dense_params
    keep = next(run_method(model, None, "magnitude", [one_channel])).keep
    assert not keep[1, "mlp_channel"][5]
    assert keep.num_pruned() == 1


def test_dense_model_untouched_after_run():
    model = tiny_model("qwen2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    list(run_method(model, None, "magnitude", [0.3, 0.6]))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any("parametrizations" in k for k in model.state_dict())


def test_compact_subnetwork_reports_params():
    model = tiny_model("mistral")
    subnetwork = next(run_method(model, None, "magnitude", [0.4]))
    compact, params = compact_subnetwork(model, subnetwork)
    assert params["decoder"] == sum(p.numel() for p in compact.model.layers.parameters())
    assert abs(1 - params["decoder"] / params["decoder_dense"] - subnetwork.sparsity) < 1e-9
    with torch.no_grad():
        assert torch.isfinite(compact(random_ids()).logits).all()


@pytest.mark.parametrize(
    ("targets", "message"),
    [([], "at least one"), ([0.0], "outside"), ([1.2], "outside"), ([0.999], "above what the prunable layers")],
)
def test_bad_targets(targets, message):
    with pytest.raises(TargetError, match=message):
        list(run_method(tiny_model("llama"), None, "magnitude", targets))


def test_bad_method_and_options():
    model = tiny_model("llama")
    with pytest.raises(UnknownNameError, match="available"):
        list(run_method(model, None, "nope", [0.2]))
    with pytest.raises(OptionError, match="unknown option 'steps' for magnitude; valid options: none"):
        list(run_method(model, None, "magnitude", [0.2], options={"steps": "3"}))
