"""OWL-sp: outlier ratios, layer ratios and masks equal an independent computation; spread 0 is Wanda-sp."""

import json

import pytest
import torch

from gisp_plugin.adapters.api import adapter_for
from gisp_plugin.cli import main
from gisp_plugin.data.api import CalibrationSet
from gisp_plugin.pruning import run_method
from tests.baselines.independent import calibration_ids, capture_inputs, lowest
from tests.tiny import tiny_folder, tiny_model

THRESHOLD, SPREAD = 3.0, 0.1


def independent_owl(model, ids: torch.Tensor, threshold: float, spread: float):
    """LODs and sparsity offsets from one plain dense forward with hooks on every linear, as OWL's code
    does (scores of all linears of a block concatenated), and Wanda-sp unit scores from the same inputs."""
    lods, head_scores, channel_scores = [], [], []
    for i, layer in enumerate(model.model.layers):
        linears = {f"model.layers.{i}.{p}": m for p, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        inputs = capture_inputs(model, ids, list(linears))
        scores = torch.cat([(m.weight.detach().double().abs() * inputs[n].norm(dim=0)).flatten() for n, m in linears.items()])
        lods.append(float((scores > threshold * scores.mean()).double().mean()))
        o_proj, down = layer.self_attn.o_proj, layer.mlp.down_proj
        x_o, x_down = inputs[f"model.layers.{i}.self_attn.o_proj"], inputs[f"model.layers.{i}.mlp.down_proj"]
        per_column = (o_proj.weight.detach().double().abs() * x_o.norm(dim=0)).mean(0)
        head_scores.append(per_column.reshape(-1, layer.self_attn.head_dim).sum(1))
        channel_scores.append((down.weight.detach().double().abs() * x_down.norm(dim=0)).mean(0))
    lod = torch.tensor(lods, dtype=torch.float64)
    spread_out = (lod - lod.min()) / (lod.max() - lod.min()) * 2 * spread
    return lods, (spread_out.mean() - spread_out).tolist(), head_scores, channel_scores


def pruned(keep, layer, kind) -> list[int]:
    return sorted((~keep[layer, kind]).nonzero().flatten().tolist())


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_outlier_ratios_layer_ratios_and_masks_match_independent_computation(family):
    model = tiny_model(family, layers=4, intermediate_size=128)
    anatomy = adapter_for(model).anatomy(model)
    ids = calibration_ids()
    options = {"outlier_threshold": str(THRESHOLD), "spread": str(SPREAD), "sequential": "false"}
    (sub,) = run_method(model, None, "owl_sp", [0.4], options, calibration=CalibrationSet("ids", list(ids)))
    lods, offsets, head_scores, channel_scores = independent_owl(model, ids, THRESHOLD, SPREAD)

    # a weight's score either side of M x mean is a count: the fractions agree to float rounding
    assert sub.info["outlier_ratios"] == pytest.approx(lods, abs=1e-12)
    assert len(set(lods)) > 1  # a real spread to check
    ratio, layer_ratios = sub.info["ratio"], sub.info["layer_ratios"]
    assert [r - ratio for r in layer_ratios] == pytest.approx(offsets, abs=1e-12)
    assert max(layer_ratios) - min(layer_ratios) == pytest.approx(2 * SPREAD)
    most, least = max(range(4), key=lods.__getitem__), min(range(4), key=lods.__getitem__)
    assert layer_ratios[most] == min(layer_ratios) and layer_ratios[least] == max(layer_ratios)
    for i in range(4):
        n_heads = round(layer_ratios[i] * anatomy.kind(i, "attn_head").count)
        n_channels = round(layer_ratios[i] * anatomy.kind(i, "mlp_channel").count)
        assert pruned(sub.keep, i, "attn_head") == sorted(lowest(head_scores[i], n_heads))
        assert pruned(sub.keep, i, "mlp_channel") == sorted(lowest(channel_scores[i], n_channels))
    assert abs(sub.sparsity - 0.4) <= 0.02


@pytest.mark.parametrize("sequential", ["true", "false"])
def test_zero_spread_is_wanda_sp(sequential):
    model = tiny_model("llama", layers=4, intermediate_size=64)
    calibration = CalibrationSet("ids", list(calibration_ids(4)))
    targets = [0.2, 0.5]
    owl = list(run_method(model, None, "owl_sp", targets, {"spread": "0", "sequential": sequential}, calibration=calibration))
    wanda = list(run_method(model, None, "wanda_sp", targets, {"sequential": sequential}, calibration=calibration))
    for o, w in zip(owl, wanda, strict=True):
        assert o.keep == w.keep and o.info["ratio"] == w.info["ratio"]
        assert o.info["layer_ratios"] == [w.info["ratio"]] * 4


def test_dense_calibration_gives_nested_subnetworks():
    # with sequential=false the scores and the LOD offsets do not depend on the target: larger targets
    # only raise every layer's ratio, so each subnetwork keeps a subset of the one before
    model = tiny_model("mistral", layers=4, intermediate_size=128)
    calibration = CalibrationSet("ids", list(calibration_ids(4)))
    options = {"sequential": "false", "spread": "0.1"}
    subs = list(run_method(model, None, "owl_sp", [0.2, 0.4, 0.6], options, calibration=calibration))
    for small, large in zip(subs, subs[1:], strict=False):
        for key, flags in large.keep.flags.items():
            assert not bool((flags & ~small.keep[key]).any()), key
        assert large.sparsity > small.sparsity


def test_cli_end_to_end_with_options_and_bad_value(tmp_path, tokenizer, capsys):
    model_dir, text = tiny_folder(tmp_path, "llama", tokenizer)
    out = tmp_path / "out"
    common = ["prune", "--model", str(model_dir), "--method", "owl_sp", "--sparsity", "0.3", "--calibration", f"file:{text}"]
    common += ["--n-samples", "4", "--seqlen", "16", "--out", str(out)]
    assert main([*common, "-o", "spread=0.1", "-o", "outlier_threshold=4"]) == 0
    record = json.loads((out / "owl_sp-s0.30" / "pruning.json").read_text())
    assert abs(record["sparsity"] - 0.3) < 0.05
    assert record["options"]["spread"] == 0.1 and record["options"]["outlier_threshold"] == 4.0
    capsys.readouterr()
    assert main([*common, "-o", "spread=0.9"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "spread" in err[0] and "0.9" in err[0] and "Traceback" not in err[0]
