"""LLM-Pruner: Taylor group scores and masks equal a by-hand computation; layer range; nested targets."""

import pytest
import torch
from gisp_baselines.taylor import gradient_weight_paths, group_scores

from gisp_plugin.adapters.api import adapter_for
from gisp_plugin.checkpoint.trajectory import Trajectory
from gisp_plugin.data.api import CalibrationSet
from gisp_plugin.importance.gradients import accumulate_gradients
from gisp_plugin.plugins.manager import lookup
from gisp_plugin.pruning import TargetError, run_method
from tests.baselines.independent import calibration_ids, gradients, taylor_channels, taylor_head_groups
from tests.tiny import tiny_model

ALL_LAYERS = {"layer_start": "0", "layer_end": "3"}


@pytest.mark.parametrize("variant", ["param_first", "param_second", "param_mix", "vectorize"])
@pytest.mark.parametrize(("family", "head_unit"), [("llama", "kv_group"), ("mistral", "kv_group"), ("qwen2", "query_head")])
def test_group_scores_match_by_hand(variant, family, head_unit):
    model = tiny_model(family)
    anatomy = adapter_for(model).anatomy(model)
    ids = calibration_ids(4)
    second = variant in ("param_second", "param_mix")
    sums = accumulate_gradients(
        model,
        gradient_weight_paths(anatomy, [0, 1, 2], head_unit),
        CalibrationSet("ids", list(ids)),
        lookup("loss", "ntp"),
        per_sample_squares=second,
    )
    scores, groups = group_scores(model, anatomy, [0, 1, 2], sums, variant, head_unit)
    grads, acc = gradients(model, ids, second)
    for i in range(3):
        heads = taylor_head_groups(model, grads, acc, variant, i, kv_groups=head_unit == "kv_group")
        torch.testing.assert_close(scores[i, "attn_head"], heads.double(), rtol=2e-4, atol=1e-7)
        torch.testing.assert_close(scores[i, "mlp_channel"], taylor_channels(model, grads, acc, variant, i), rtol=2e-4, atol=1e-7)
    n_heads, n_kv = anatomy.kind(0, "attn_head").count, model.config.num_key_value_heads
    assert len(groups[0, "attn_head"]) == (n_kv if head_unit == "kv_group" else n_heads)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_masks_are_the_lowest_groups_of_every_layer(family):
    model = tiny_model(family)
    ids = calibration_ids(4)
    (sub,) = run_method(model, None, "llm_pruner", [0.4], ALL_LAYERS, calibration=CalibrationSet("ids", list(ids)))
    grads, _ = gradients(model, ids, False)
    ratio = sub.info["ratio"]
    attn = model.model.layers[0].self_attn
    group = (attn.q_proj.out_features // attn.head_dim) // (attn.k_proj.out_features // attn.head_dim)
    for i in range(3):
        heads = taylor_head_groups(model, grads, None, "param_first", i, kv_groups=True)
        pruned_groups = torch.sort(heads, stable=True).indices[: round(ratio * len(heads))].tolist()
        expected_heads = sorted(h for g in pruned_groups for h in range(g * group, (g + 1) * group))
        assert sorted((~sub.keep[i, "attn_head"]).nonzero().flatten().tolist()) == expected_heads
        channels = taylor_channels(model, grads, None, "param_first", i)
        expected = sorted(torch.sort(channels, stable=True).indices[: round(ratio * len(channels))].tolist())
        assert sorted((~sub.keep[i, "mlp_channel"]).nonzero().flatten().tolist()) == expected


def test_default_layer_range_keeps_first_four_and_last_two_layers():
    model = tiny_model("llama", layers=8)
    anatomy = adapter_for(model).anatomy(model)
    calibration = CalibrationSet("ids", list(calibration_ids(4)))
    (sub,) = run_method(model, None, "llm_pruner", [0.1], calibration=calibration)
    touched = sorted({i for (i, _), flags in sub.keep.flags.items() if not bool(flags.all())})
    assert touched == [4, 5]  # range(4, L - 2)
    reachable = anatomy.max_sparsity([4, 5])
    with pytest.raises(TargetError, match=f"{reachable:.3f}"):
        list(run_method(model, None, "llm_pruner", [reachable + 0.05], calibration=calibration))
    with pytest.raises(ValueError, match="layer range .* is empty"):
        list(run_method(tiny_model("llama"), None, "llm_pruner", [0.1], calibration=calibration))


def test_targets_are_nested_and_recorded_in_the_trajectory():
    model = tiny_model("qwen2", intermediate_size=64)
    trajectory = Trajectory()
    subs = list(
        run_method(
            model,
            None,
            "llm_pruner",
            [0.2, 0.35, 0.5],
            ALL_LAYERS,
            calibration=CalibrationSet("ids", list(calibration_ids(4))),
            trajectory=trajectory,
        )
    )
    assert [s.target for s in subs] == [0.2, 0.35, 0.5]
    assert subs[2].keep.is_subset_of(subs[1].keep) and subs[1].keep.is_subset_of(subs[0].keep)
    for step, sub in enumerate(subs):
        assert trajectory.keep_at(step) == sub.keep
        assert trajectory.steps[step]["sparsity"] == pytest.approx(sub.sparsity)
