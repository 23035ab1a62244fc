"""FLAP: scores, masks and compensation biases equal an independent computation; biases survive save/load."""

import pytest
import torch

from gisp_plugin.adapters.api import adapter_for
from gisp_plugin.checkpoint.saving import load_pruned, save_pruned
from gisp_plugin.data.api import CalibrationSet
from gisp_plugin.masking.masked_model import MaskedModel
from gisp_plugin.methods.options import OptionError
from gisp_plugin.pruning import compact_subnetwork, pruning_record, resolve_method, run_method
from tests.baselines.independent import calibration_ids, capture_inputs, flap_channel_metrics, lowest
from tests.tiny import tiny_model


def standardize(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / x.std()


def removed_columns(keep: torch.Tensor, width: int) -> torch.Tensor:
    return (~keep).repeat_interleave(width)


def expected_biases(model, keep, metrics) -> dict[str, torch.Tensor]:
    out = {}
    for i, layer in enumerate(model.model.layers):
        _, _, mean_o, mean_d = metrics[i]
        d = layer.self_attn.head_dim
        for path, weight, mean, flags, width in (
            ("self_attn.o_proj", layer.self_attn.o_proj.weight, mean_o, keep[i, "attn_head"], d),
            ("mlp.down_proj", layer.mlp.down_proj.weight, mean_d, keep[i, "mlp_channel"], 1),
        ):
            if not bool(flags.all()):
                cols = removed_columns(flags, width)
                out[f"model.layers.{i}.{path}"] = weight.detach().double()[:, cols] @ mean[cols]
    return out


def assert_biases(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    for path, bias in expected.items():
        torch.testing.assert_close(got[path].double(), bias, rtol=1e-5, atol=1e-6)


def test_al_am_matches_independent_global_cut():
    model = tiny_model("llama", layers=3, intermediate_size=48)
    anatomy = adapter_for(model).anatomy(model)
    ids = calibration_ids(8)
    (sub,) = run_method(model, None, "flap", [0.35], calibration=CalibrationSet("ids", list(ids)))
    metrics = flap_channel_metrics(model, ids)

    units = []  # (score, params, layer, kind, index): heads = mean of standardised channels
    for i, (attn, mlp, _, _) in enumerate(metrics):
        heads = standardize(attn).reshape(-1, 8).mean(1)
        units += [(float(s), anatomy.kind(i, "attn_head").params_per_unit, i, "attn_head", h) for h, s in enumerate(heads)]
        units += [
            (float(s), anatomy.kind(i, "mlp_channel").params_per_unit, i, "mlp_channel", c)
            for c, s in enumerate(standardize(mlp))
        ]
    units.sort(key=lambda u: u[0])
    removed = torch.tensor([0] + [u[1] for u in units]).cumsum(0).double()
    count = int((removed - 0.35 * anatomy.dense_params).abs().argmin())
    expected = {(i, kind, u) for _, _, i, kind, u in units[:count]}
    got = {(i, kind, u) for (i, kind), flags in sub.keep.flags.items() for u in (~flags).nonzero().flatten().tolist()}
    assert got == expected
    assert_biases(sub.extra_biases, expected_biases(model, sub.keep, metrics))


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_ul_um_matches_independent_per_layer_cut(family):
    model = tiny_model(family)
    anatomy = adapter_for(model).anatomy(model)
    ids = calibration_ids(8)
    (sub,) = run_method(model, None, "flap", [0.3], {"structure": "UL-UM"}, calibration=CalibrationSet("ids", list(ids)))
    metrics = flap_channel_metrics(model, ids)
    ratio = sub.info["ratio"]
    for i, (attn, mlp, _, _) in enumerate(metrics):
        heads = attn.reshape(anatomy.kind(i, "attn_head").count, -1).sum(1)  # UL-UM: head = sum of channels
        n_heads, n_channels = round(ratio * len(heads)), round(ratio * len(mlp))
        assert sorted((~sub.keep[i, "attn_head"]).nonzero().flatten().tolist()) == sorted(lowest(heads, n_heads))
        assert sorted((~sub.keep[i, "mlp_channel"]).nonzero().flatten().tolist()) == sorted(lowest(mlp, n_channels))
    assert_biases(sub.extra_biases, expected_biases(model, sub.keep, metrics))


def test_compensation_keeps_the_mean_output_of_the_first_layer():
    model = tiny_model("mistral")
    ids = calibration_ids(8)
    (sub,) = run_method(model, None, "flap", [0.4], {"structure": "UL-UM"}, calibration=CalibrationSet("ids", list(ids)))
    assert not bool(sub.keep[0, "attn_head"].all()), "the check needs pruned heads in layer 0"
    anatomy = adapter_for(model).anatomy(model)
    path = "model.layers.0.self_attn.o_proj"

    def mean_output(keep=None, biases=None):
        out = {}
        with MaskedModel(model, anatomy) as masked, torch.no_grad():
            if keep is not None:
                masked.apply(keep, biases)
            # registered after the bias hooks, so it sees the compensated output
            handle = model.get_submodule(path).register_forward_hook(lambda m, a, o: out.__setitem__("y", o.double()))
            model(ids)
            handle.remove()
        return out["y"].reshape(-1, out["y"].shape[-1]).mean(0)

    dense = mean_output()
    compensated = mean_output(sub.keep, sub.extra_biases)
    uncompensated = mean_output(sub.keep, {})
    torch.testing.assert_close(compensated, dense, rtol=1e-5, atol=1e-5)
    assert (uncompensated - dense).abs().max() > 100 * (compensated - dense).abs().max()


def test_biases_land_in_the_compacted_model_and_survive_save_and_load(tmp_path, tokenizer):
    model = tiny_model("qwen2")
    ids = calibration_ids(8)
    (sub,) = run_method(model, tokenizer, "flap", [0.3], calibration=CalibrationSet("ids", list(ids)))
    assert sub.extra_biases
    anatomy = adapter_for(model).anatomy(model)
    with MaskedModel(model, anatomy) as masked, torch.no_grad():
        masked.apply(sub.keep, sub.extra_biases)
        expected = model(ids).logits
    compact, params = compact_subnetwork(model, sub)
    record = pruning_record("tiny-qwen2", "flap", resolve_method("flap")[1], sub, compact, params, "ids", 0)
    folder = save_pruned(compact, tokenizer, tmp_path / "flap", record)
    loaded = load_pruned(folder)
    with torch.no_grad():
        torch.testing.assert_close(compact(ids).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-5, atol=1e-5)
    for path, bias in sub.extra_biases.items():
        dense_bias = model.get_submodule(path).bias
        want = bias if dense_bias is None else dense_bias + bias
        torch.testing.assert_close(loaded.get_submodule(path).bias.detach(), want.float(), rtol=1e-6, atol=1e-7)


def test_pruned_propagation_agrees_on_the_first_layer_and_needs_ul_um():
    model = tiny_model("llama")
    calibration = CalibrationSet("ids", list(calibration_ids(8)))
    dense = next(iter(run_method(model, None, "flap", [0.3], {"structure": "UL-UM"}, calibration=calibration)))
    pruned = next(
        iter(run_method(model, None, "flap", [0.3], {"structure": "UL-UM", "propagate": "pruned"}, calibration=calibration))
    )
    for kind in ("attn_head", "mlp_channel"):
        assert torch.equal(dense.keep[0, kind], pruned.keep[0, kind])
    assert_biases(
        {k: v for k, v in pruned.extra_biases.items() if ".layers.0." in k},
        {k: v.double() for k, v in dense.extra_biases.items() if ".layers.0." in k},
    )
    with pytest.raises(ValueError, match="propagate='pruned' needs structure='UL-UM'"):
        list(run_method(model, None, "flap", [0.3], {"propagate": "pruned"}, calibration=calibration))
    with pytest.raises(OptionError, match="structure"):
        list(run_method(model, None, "flap", [0.3], {"structure": "XL"}, calibration=calibration))


def test_first_layer_input_capture_is_what_the_metrics_see():
    # guards the independent reference itself: hooks see every token once
    model = tiny_model("llama")
    ids = calibration_ids(3)
    x = capture_inputs(model, ids, ["model.layers.0.mlp.down_proj"])
    assert x["model.layers.0.mlp.down_proj"].shape == (3 * ids.shape[1], 32)
