"""SlimGPT: OBS errors and compensation against direct least-squares solves, end to end on a tiny model.

The independent computation is ``torch.linalg.lstsq``: the best weight on the kept columns is the
least-squares fit of the dense layer's outputs ``X W^T`` from the kept inputs ``X[:, kept]``, and the
error of removing a unit is that fit's residual. With ``damp=0`` the method's OBS updates must give the
same weight (and its per-unit errors the same residuals); on the tiny model the inputs are captured with
plain forward hooks on a copy that carries the earlier layers' decisions and compensated weights.
"""

import copy

import pytest
import torch
from gisp_baselines.obs import halving_groups, obs_prune, unit_columns, unit_errors
from gisp_baselines.slimgpt import SlimGptOptions, depth_weights

from gisp_plugin.adapters.api import adapter_for
from gisp_plugin.anatomy.structures import KeepMask
from gisp_plugin.checkpoint.saving import load_pruned, save_pruned
from gisp_plugin.data.api import CalibrationSet
from gisp_plugin.harness.runner import _subnetwork_tensors, _subnetworks_from_json
from gisp_plugin.masking.masked_model import MaskedModel
from gisp_plugin.pruning import compact_subnetwork, run_method
from tests.tiny import random_ids, record_for, tiny_model

PROJECTIONS = {"attn_head": "self_attn.o_proj", "mlp_channel": "mlp.down_proj"}


def lstsq_fit(x: torch.Tensor, weight: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The weight on columns ``kept`` (others 0) whose outputs best fit ``x @ weight.T``, and the residual."""
    target = x @ weight.T  # [tokens, out]
    solution = torch.linalg.lstsq(x[:, kept], target).solution  # [kept, out]
    fitted = torch.zeros_like(weight)
    fitted[:, kept] = solution.T
    return fitted, float((x @ fitted.T - target).square().sum())


def random_layer(tokens: int = 200, columns: int = 24, out: int = 10, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, columns, generator=generator, dtype=torch.float64)
    x = x @ torch.randn(columns, columns, generator=generator, dtype=torch.float64)  # correlated inputs
    return x, torch.randn(out, columns, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("width", [1, 4])
def test_unit_errors_are_the_least_squares_residuals_of_removing_each_unit(width):
    x, weight = random_layer()
    count = 24 // width
    columns = unit_columns(count, width)
    errors = unit_errors(weight, torch.linalg.inv(x.T @ x), columns, torch.ones(count, dtype=torch.bool))
    for unit in range(count):
        kept = torch.ones(24, dtype=torch.bool)
        kept[columns[unit]] = False
        assert float(errors[unit]) == pytest.approx(lstsq_fit(x, weight, kept)[1], rel=1e-8)


@pytest.mark.parametrize(("width", "groups"), [(4, [1, 1, 1]), (1, [4, 2, 1, 1])])
def test_greedy_obs_chooses_the_least_residual_units_and_fits_the_kept_ones(width, groups):
    x, weight = random_layer()
    count = 24 // width
    columns = unit_columns(count, width)
    result = obs_prune(weight, x.T @ x, columns, groups, damp=0.0)
    kept = torch.ones(24, dtype=torch.bool)
    removed: list[int] = []
    for size in groups:  # brute force: each round, the units whose single removal leaves the least residual
        residual = {}
        for unit in (u for u in range(count) if u not in removed):
            trial = kept.clone()
            trial[columns[unit]] = False
            residual[unit] = lstsq_fit(x, lstsq_fit(x, weight, kept)[0], trial)[1]
        chosen = sorted(residual, key=lambda u: (residual[u], u))[:size]
        removed += chosen
        for unit in chosen:
            kept[columns[unit]] = False
    assert sorted(result.removed) == sorted(removed)
    torch.testing.assert_close(result.weight, lstsq_fit(x, weight, kept)[0], rtol=1e-7, atol=1e-9)


def test_dynamic_group_sizes_halve_down_to_single_units():
    assert halving_groups(7) == [4, 2, 1]
    assert halving_groups(1) == [1]
    assert halving_groups(10) == [5, 3, 1, 1]
    assert sum(halving_groups(1000)) == 1000


def test_ratio_rises_logarithmically_with_depth():
    weights = depth_weights(4, "log")
    assert weights[0] == 0.0 and weights[-1] == 1.0 and weights == sorted(weights)
    assert depth_weights(4, "uniform") == [1.0] * 4
    with pytest.raises(ValueError, match="schedule must be one of log, uniform"):
        SlimGptOptions(schedule="linear")


@pytest.fixture(scope="module")
def pruned():
    model = tiny_model("llama", layers=3)
    generator = torch.Generator().manual_seed(1)
    calibration = CalibrationSet("ids", [torch.randint(3, 320, (20,), generator=generator) for _ in range(8)])  # 160 tokens
    options = {"damp": 0.0, "batch_size": 3}
    (subnetwork,) = run_method(model, None, "slimgpt", [0.3], options, calibration)
    return model, calibration, subnetwork


def captured_inputs(model, calibration, layer: int, subnetwork) -> dict[str, torch.Tensor]:
    """The inputs of layer ``layer``'s output projections with the layers before it as the subnetwork left
    them (pruned and compensated) and the layer itself dense: plain copies and hooks, no masks."""
    plain = copy.deepcopy(model)
    with torch.no_grad():
        for path, value in subnetwork.updated_weights.items():
            if int(path.split(".")[2]) < layer:
                plain.get_parameter(path).copy_(value)
        for index in range(layer):  # removed units of earlier layers: their output columns are zero
            for kind, projection in PROJECTIONS.items():
                weight = plain.model.layers[index].get_submodule(projection).weight
                width = weight.shape[1] // subnetwork.keep[index, kind].numel()
                weight[:, ~subnetwork.keep[index, kind].repeat_interleave(width)] = 0
    inputs: dict[str, list[torch.Tensor]] = {kind: [] for kind in PROJECTIONS}
    handles = [
        plain.model.layers[layer]
        .get_submodule(projection)
        .register_forward_pre_hook(lambda module, args, kind=kind: inputs[kind].append(args[0][0].double()))
        for kind, projection in PROJECTIONS.items()
    ]
    with torch.no_grad():
        for ids in calibration.sequences:
            plain(ids[None])
    for handle in handles:
        handle.remove()
    return {kind: torch.cat(values) for kind, values in inputs.items()}


@pytest.mark.parametrize("layer", [1, 2])
def test_compensation_is_the_least_squares_fit_on_the_calibration_inputs(pruned, layer):
    model, calibration, subnetwork = pruned
    inputs = captured_inputs(model, calibration, layer, subnetwork)
    for kind, projection in PROJECTIONS.items():
        flags = subnetwork.keep[layer, kind]
        assert not bool(flags.all()), "the log schedule prunes every layer after the first"
        dense = model.model.layers[layer].get_submodule(projection).weight.detach().double()
        kept = flags.repeat_interleave(dense.shape[1] // flags.numel())
        expected, _ = lstsq_fit(inputs[kind], dense, kept)
        got = subnetwork.updated_weights[f"model.layers.{layer}.{projection}.weight"].double()
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)  # float32 activations, float64 solves


def test_first_layer_is_kept_whole_by_the_log_schedule(pruned):
    _, _, subnetwork = pruned
    assert bool(subnetwork.keep[0, "attn_head"].all()) and bool(subnetwork.keep[0, "mlp_channel"].all())
    assert not any(path.startswith("model.layers.0.") for path in subnetwork.updated_weights)
    ratios = subnetwork.info["layer_ratios"]
    assert ratios == sorted(ratios) and abs(subnetwork.sparsity - 0.3) < 0.05


def test_masked_compacted_saved_and_reloaded_models_compute_the_compensated_network(pruned, tmp_path, tokenizer):
    model, _, subnetwork = pruned
    anatomy = adapter_for(model).anatomy(model)
    dense_before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ids = random_ids(2, 9)
    with torch.no_grad():
        with MaskedModel(model, anatomy) as masked:
            masked.apply(subnetwork.keep, updated_weights=subnetwork.updated_weights)
            expected = model(ids).logits
            masked.apply(subnetwork.keep)  # the same mask without the compensation computes something else
            assert not torch.allclose(model(ids).logits, expected, atol=1e-3)
        for name, p in model.named_parameters():  # released: the dense weights bit for bit
            assert torch.equal(p, dense_before[name]), name
        compact, params = compact_subnetwork(model, subnetwork)
        torch.testing.assert_close(compact(ids).logits, expected, rtol=1e-5, atol=1e-5)
        assert params["decoder"] == anatomy.params_kept(subnetwork.keep)
        for name, p in model.named_parameters():  # compaction restores the dense weights too
            assert torch.equal(p, dense_before[name]), name
        folder = save_pruned(compact, tokenizer, tmp_path / "pruned", record_for(compact, anatomy, subnetwork.keep))
        torch.testing.assert_close(load_pruned(folder)(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_comparison_cache_keeps_updated_weights_apart_from_biases(pruned):
    model, _, subnetwork = pruned
    anatomy = adapter_for(model).anatomy(model)
    bias = {"model.layers.1.mlp.down_proj": torch.ones(48)}
    both = [subnetwork, type(subnetwork)(0.4, KeepMask.dense(anatomy), 0.0, extra_biases=bias)]
    entries = [{"target": s.target, "sparsity": s.sparsity, "keep": s.keep.to_json(), "info": {}} for s in both]
    back = _subnetworks_from_json(entries, anatomy, _subnetwork_tensors(both))
    assert back[0].extra_biases == {} and back[1].updated_weights == {}
    assert set(back[0].updated_weights) == set(subnetwork.updated_weights)
    for path, value in subnetwork.updated_weights.items():
        assert torch.equal(back[0].updated_weights[path], value)
    assert torch.equal(back[1].extra_biases["model.layers.1.mlp.down_proj"], torch.ones(48))


def test_mixture_of_experts_is_refused_naming_the_method():
    model = tiny_model("mixtral", layers=2)
    with pytest.raises(ValueError, match="slimgpt does not prune routed experts"):
        next(run_method(model, None, "slimgpt", [0.2], {}, CalibrationSet("ids", [torch.arange(3, 20)])))
