"""GISP options from the reference: taylor variants, separate ranking, blocks, schedules (adaptive too).

Scores and masks are checked against plain autograd and by-hand rankings (``tests/baselines/independent``
computes the Taylor terms without the core's salience or gradient engine).
"""

import json
import logging
import math

import pytest
import torch

from gisp_plugin.adapters.api import adapter_for
from gisp_plugin.checkpoint.trajectory import Trajectory
from gisp_plugin.data.api import CalibrationSet
from gisp_plugin.importance.structure_scores import model_scores
from gisp_plugin.masking.masked_model import MaskedModel
from gisp_plugin.methods import gisp
from gisp_plugin.methods.gisp import GispOptions, max_sparsity, step_scores, structure_scores
from gisp_plugin.methods.gisp_schedules import Schedule, adaptive_end
from gisp_plugin.methods.options import OptionError
from gisp_plugin.pruning import TargetError, resolve_method, run_method
from tests.baselines.independent import calibration_ids, gradients, taylor_channels, taylor_head_groups
from tests.tiny import tiny_model

# --- taylor ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["param_first", "param_second", "param_mix"])
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_taylor_scores_match_plain_autograd(variant, family):
    """Heads: q rows + o columns (+ k/v rows without GQA); channels: gate/up rows + down column."""
    model = tiny_model(family)
    anatomy = adapter_for(model).anatomy(model)
    ids = calibration_ids(4)
    raw, sums = step_scores(model, anatomy, CalibrationSet("ids", list(ids)), GispOptions(taylor=variant))
    assert (sums.grad_sq is not None) == (variant != "param_first")
    grads, acc = gradients(model, ids, variant != "param_first")
    for i in range(3):
        heads = taylor_head_groups(model, grads, acc, variant, i, kv_groups=False)
        torch.testing.assert_close(raw[i, "attn_head"], heads.double(), rtol=2e-4, atol=1e-9)
        torch.testing.assert_close(raw[i, "mlp_channel"], taylor_channels(model, grads, acc, variant, i), rtol=2e-4, atol=1e-9)


def test_param_first_is_bit_identical_to_the_plain_formula():
    model = tiny_model("mistral")
    anatomy = adapter_for(model).anatomy(model)
    _, sums = step_scores(model, anatomy, CalibrationSet("ids", list(calibration_ids(4))), GispOptions())
    plain = model_scores(model, anatomy, lambda path, w: (w.detach().float() * sums.grad[path]).abs())
    scores = structure_scores(model, anatomy, sums)
    assert all(torch.equal(scores[key], plain[key]) for key in plain)


def test_second_order_scores_of_pruned_units_are_zero():
    model = tiny_model("llama")
    anatomy = adapter_for(model).anatomy(model)
    calibration = CalibrationSet("ids", list(calibration_ids(4)))
    (sub,) = run_method(model, None, "gisp", [0.3], {"steps": "2", "taylor": "param_mix", "protect": "none"}, calibration)
    with MaskedModel(model, anatomy) as masked:
        masked.apply(sub.keep)
        raw, _ = step_scores(model, anatomy, calibration, GispOptions(taylor="param_second"))
    for key, values in raw.items():
        assert torch.all(values[~sub.keep[key]] == 0) and torch.all(values[sub.keep[key]] > 0), key


# --- rank=separate ---------------------------------------------------------------------------------------


def test_separate_ranking_prunes_the_lowest_of_each_pool_at_one_parameter_fraction():
    """By hand: hand-computed |W * g| ranks heads among heads and channels among channels; each pool loses
    the count of units whose parameters are closest to f * (its parameters), f = target * dense / pools."""
    model = tiny_model("llama", layers=4)
    anatomy = adapter_for(model).anatomy(model)
    ids = calibration_ids(4)
    target = 0.35
    (sub,) = run_method(
        model, None, "gisp", [target], {"steps": "1", "protect": "none", "rank": "separate"}, CalibrationSet("ids", list(ids))
    )
    grads, _ = gradients(model, ids, False)
    hidden, d, n_heads, channels, layers = 48, 8, 6, 32, 4
    heads = torch.cat([taylor_head_groups(model, grads, None, "param_first", i, kv_groups=False) for i in range(layers)])
    chans = torch.cat([taylor_channels(model, grads, None, "param_first", i) for i in range(layers)])
    head_params, channel_params = 4 * d * hidden, 3 * hidden
    pools = layers * (n_heads * head_params + channels * channel_params)
    fraction = target * anatomy.dense_params / pools
    n_heads_cut = round(fraction * layers * n_heads)
    n_channels_cut = round(fraction * layers * channels)
    pruned_heads = torch.cat([~sub.keep[i, "attn_head"] for i in range(layers)])
    pruned_channels = torch.cat([~sub.keep[i, "mlp_channel"] for i in range(layers)])
    assert sorted(pruned_heads.nonzero().flatten().tolist()) == sorted(torch.sort(heads).indices[:n_heads_cut].tolist())
    assert sorted(pruned_channels.nonzero().flatten().tolist()) == sorted(torch.sort(chans).indices[:n_channels_cut].tolist())
    head_share = n_heads_cut / (layers * n_heads)
    channel_share = n_channels_cut / (layers * channels)
    assert abs(head_share - fraction) <= 0.5 / (layers * n_heads) and abs(channel_share - fraction) <= 0.5 / (layers * channels)
    assert abs(sub.sparsity - target) <= (head_params / 2 + channel_params / 2) / anatomy.dense_params


def test_separate_ranking_gives_each_pool_the_same_parameter_fraction_under_gqa():
    model = tiny_model("mistral", layers=4)
    anatomy = adapter_for(model).anatomy(model)
    options = {"steps": "3", "protect": "none", "rank": "separate"}
    calibration = CalibrationSet("ids", list(calibration_ids(4)))
    subnetworks = list(run_method(model, None, "gisp", [0.2, 0.4], options, calibration))
    for sub in subnetworks:
        removed = {"attention": 0, "mlp": 0}
        total = {"attention": 0, "mlp": 0}
        for layer in anatomy.layers:
            for name, kind in layer.kinds.items():
                total[kind.block] += kind.dense_params
                removed[kind.block] += kind.dense_params - kind.params_kept(sub.keep[layer.index, name])
        fraction = sub.target * anatomy.dense_params / sum(total.values())
        largest_head = anatomy.kind(0, "attn_head").params_per_unit + anatomy.kind(0, "attn_head").dependents[0].params_per_unit
        assert abs(removed["attention"] / total["attention"] - fraction) <= largest_head / total["attention"]
        assert abs(removed["mlp"] / total["mlp"] - fraction) <= anatomy.kind(0, "mlp_channel").params_per_unit / total["mlp"]
    assert subnetworks[1].keep.is_subset_of(subnetworks[0].keep)


def test_separate_ranking_reach_and_the_refusal_above_it():
    model = tiny_model("llama", layers=4)
    anatomy = adapter_for(model).anatomy(model)
    # layers 0 and 3 of 4 protected: half of each pool can go, so half of the pools' parameters
    pools = sum(kind.dense_params for layer in anatomy.layers for kind in layer.kinds.values())
    reach = max_sparsity(anatomy, GispOptions(rank="separate", protect="0,3"))
    assert reach == pytest.approx(0.5 * pools / anatomy.dense_params)
    assert max_sparsity(anatomy, GispOptions(rank="separate", blocks="attention")) == pytest.approx(
        max_sparsity(anatomy, GispOptions(blocks="attention"))
    )
    with pytest.raises(TargetError, match="above what the prunable layers can give"):
        next(
            run_method(
                model,
                None,
                "gisp",
                [reach + 0.01],
                {"rank": "separate", "protect": "0,3"},
                CalibrationSet("ids", list(calibration_ids(2))),
            )
        )


# --- blocks ----------------------------------------------------------------------------------------------


def test_blocks_mlp_means_every_channel_block():
    assert GispOptions(blocks="mlp").prunable_blocks == {"mlp", "shared_expert", "expert_mlp"}
    assert GispOptions(blocks="attention+mlp").prunable_blocks == {"attention", "mlp", "shared_expert", "expert_mlp"}
    assert GispOptions(blocks="shared_expert").prunable_blocks == {"shared_expert"}
    assert GispOptions(blocks="all").prunable_blocks is None
    with pytest.raises(OptionError, match="give all, or block types joined by"):
        resolve_method("gisp", {"blocks": "heads"})


@pytest.mark.parametrize(
    ("family", "blocks"), [("llama", "attention"), ("llama", "mlp"), ("qwen2_moe", "mlp"), ("mixtral", "mlp")]
)
def test_blocks_prune_only_their_structures(family, blocks):
    model = tiny_model(family)
    anatomy = adapter_for(model).anatomy(model)
    options = {"steps": "2", "protect": "none", "blocks": blocks}
    (sub,) = run_method(model, None, "gisp", [0.15], options, CalibrationSet("ids", list(calibration_ids(2))))
    pruned_blocks = {anatomy.kind(layer, name).block for (layer, name), flags in sub.keep.flags.items() if not bool(flags.all())}
    if blocks == "attention":
        assert pruned_blocks == {"attention"}
    else:
        assert "attention" not in pruned_blocks and pruned_blocks
        if family == "qwen2_moe":  # shared-expert and routed-expert channels both count as mlp
            kinds = {kind.block for layer in anatomy.layers for kind in layer.kinds.values()} - {"attention"}
            assert kinds == {"shared_expert", "expert_mlp"}
    assert abs(sub.sparsity - 0.15) < 0.02


# --- schedules -------------------------------------------------------------------------------------------


def test_fixed_schedule_points():
    top, steps = 0.5, 4
    ends = {
        name: [Schedule(name, steps, top, alpha=2.0).end(i, 0.0, []) for i in range(steps)] for name in ("cosine", "exponential")
    }
    assert ends["cosine"] == pytest.approx([top * (1 - math.cos(math.pi * k / 4)) / 2 for k in (1, 2, 3, 4)])
    assert ends["exponential"] == pytest.approx([top * (1 - math.exp(-2.0 * k / 4)) / (1 - math.exp(-2.0)) for k in (1, 2, 3, 4)])
    convex = [Schedule("exponential", steps, top, alpha=-2.0).end(i, 0.0, []) for i in range(steps)]
    assert convex[0] < top / 4 < ends["exponential"][0]  # alpha < 0: small steps first
    assert ends["cosine"][-1] == ends["exponential"][-1] == top


def test_adaptive_rule_by_hand():
    # slopes 1.0 on [0, 0.1] and 2.0 on [0.1, 0.2]: b = ln 2 / 0.1; six passes left over R = 0.3
    history = [(0.0, 2.0), (0.1, 2.1), (0.2, 2.3)]
    b = math.log(2) / 0.1
    expected = math.log(1 + (2**3 - 1) / 6) / b  # exp(b * 0.3) = 8
    assert adaptive_end(history, 0.2, 0.5, 6, limit=3.0) == pytest.approx(0.2 + expected)
    assert adaptive_end(history, 0.2, 0.5, 6, limit=2.0) == pytest.approx(0.2 + 2 * 0.3 / 6)  # capped at limit x even
    falling = [(0.0, 2.0), (0.1, 2.2), (0.2, 2.3)]  # the rise slows down: a smaller step than even
    assert 0.2 + 0.3 / 12 <= adaptive_end(falling, 0.2, 0.5, 6, limit=2.0) < 0.2 + 0.3 / 6
    flat = [(0.0, 2.0), (0.1, 2.0), (0.2, 1.99)]  # the loss did not rise: the largest step
    assert adaptive_end(flat, 0.2, 0.5, 6, limit=2.0) == pytest.approx(0.3)
    assert adaptive_end(history[:2], 0.1, 0.5, 4, limit=2.0) == pytest.approx(0.2)  # two points: even split
    assert adaptive_end(flat, 0.2, 0.5, 2, limit=2.0) == pytest.approx(0.2 + 0.3 - 0.3 / 4)  # leaves the last pass its share


def test_schedule_options_are_validated():
    with pytest.raises(OptionError, match="schedule='step' is not one of linear, cosine, exponential, adaptive"):
        resolve_method("gisp", {"schedule": "step"})
    with pytest.raises(OptionError, match="exp_alpha=0 is the linear schedule"):
        resolve_method("gisp", {"schedule": "exponential", "exp_alpha": "0"})
    with pytest.raises(OptionError, match="adaptive_limit=0.5 must be >= 1"):
        resolve_method("gisp", {"adaptive_limit": "0.5"})
    with pytest.raises(OptionError, match="taylor='vectorize' is not one of"):
        resolve_method("gisp", {"taylor": "vectorize"})


def count_passes(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = gisp.accumulate_gradients

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(gisp, "accumulate_gradients", counted)
    return calls


@pytest.mark.parametrize("schedule", ["cosine", "exponential", "adaptive"])
def test_schedules_hit_every_target_nested_within_the_pass_budget(schedule, monkeypatch):
    model = tiny_model("mistral", layers=4)
    anatomy = adapter_for(model).anatomy(model)
    targets = [0.15, 0.3, 0.45]
    calls = count_passes(monkeypatch)
    trajectory = Trajectory()
    options = {"steps": "5", "protect": "none", "schedule": schedule}
    subnetworks = list(
        run_method(model, None, "gisp", targets, options, CalibrationSet("ids", list(calibration_ids(4))), trajectory=trajectory)
    )
    assert len(calls) == 5 and sorted({s["gradient_step"] for s in trajectory.steps}) == [0, 1, 2, 3, 4]
    largest = max(
        k.params_per_unit + sum(d.params_per_unit for d in k.dependents) for lay in anatomy.layers for k in lay.kinds.values()
    )
    assert [s.target for s in subnetworks] == targets
    for sub in subnetworks:
        assert abs(sub.sparsity - sub.target) <= largest / anatomy.dense_params
    for smaller, larger in zip(subnetworks, subnetworks[1:], strict=False):
        assert larger.keep.is_subset_of(smaller.keep)
    # every pass cut to the end the schedule gives for the recorded history (sparsity and loss of each pass)
    plan = Schedule(schedule, 5, 0.45)
    history, start = [], 0.0
    for step in range(5):
        entries = [s for s in trajectory.steps if s["gradient_step"] == step]
        history.append((entries[0]["gradient_at_sparsity"], entries[0]["loss"]))
        assert entries[-1]["scheduled"] == plan.end(step, start, history)
        start = entries[-1]["scheduled"]


def test_adaptive_is_deterministic():
    model = tiny_model("llama", layers=4)
    calibration = CalibrationSet("ids", list(calibration_ids(4)))
    options = {"steps": "5", "protect": "none", "schedule": "adaptive"}
    runs = [Trajectory(), Trajectory()]
    for trajectory in runs:
        list(run_method(model, None, "gisp", [0.2, 0.4], options, calibration, trajectory=trajectory))
    assert [s["scheduled"] for s in runs[0].steps] == [s["scheduled"] for s in runs[1].steps]
    assert all(runs[0].keep_at(i) == runs[1].keep_at(i) for i in range(len(runs[0].steps)))


def test_adaptive_resume_after_interruption_equals_an_uninterrupted_run(tmp_path, monkeypatch, caplog):
    model = tiny_model("mistral", layers=4)
    calibration = CalibrationSet("ids", list(calibration_ids(4)))
    options = {"steps": "5", "protect": "none", "schedule": "adaptive"}
    targets = [0.2, 0.4]
    full = Trajectory()
    uninterrupted = list(run_method(model, None, "gisp", targets, options, calibration, trajectory=full))

    work = tmp_path / "work"
    run = run_method(model, None, "gisp", targets, options, calibration, work_dir=work)
    next(run)  # stop after the first target
    run.close()
    saved = json.loads((work / gisp.STATE_FILE).read_text())["trajectory"]["steps"]
    finished = len({s["gradient_step"] for s in saved})
    assert 0 < finished < 5

    calls = count_passes(monkeypatch)
    real = gisp.accumulate_gradients

    def crash_on_second_pass(*args, **kwargs):
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(gisp, "accumulate_gradients", crash_on_second_pass)
    with caplog.at_level(logging.INFO, logger="gisp_plugin.methods.gisp"), pytest.raises(KeyboardInterrupt):
        list(run_method(model, None, "gisp", targets, options, calibration, work_dir=work))
    assert f"after {finished} of 5 steps" in caplog.text
    monkeypatch.undo()

    resumed_trajectory = Trajectory()
    resumed = list(run_method(model, None, "gisp", targets, options, calibration, work_dir=work, trajectory=resumed_trajectory))
    assert [s.keep for s in resumed] == [s.keep for s in uninterrupted]
    assert [s["scheduled"] for s in resumed_trajectory.steps] == [s["scheduled"] for s in full.steps]
    assert all(resumed_trajectory.keep_at(i) == full.keep_at(i) for i in range(len(full.steps)))


def test_a_state_that_does_not_continue_the_schedule_is_ignored(tmp_path, caplog):
    model = tiny_model("llama")
    calibration = CalibrationSet("ids", list(calibration_ids(2)))
    options = {"steps": "3", "schedule": "adaptive", "protect": "none"}
    work = tmp_path / "work"
    run = run_method(model, None, "gisp", [0.2, 0.4], options, calibration, work_dir=work)
    next(run)
    run.close()
    path = work / gisp.STATE_FILE
    state = json.loads(path.read_text())
    state["trajectory"]["steps"][-1]["scheduled"] += 0.01  # a decision the schedule would not make
    path.write_text(json.dumps(state))
    with caplog.at_level(logging.WARNING, logger="gisp_plugin.methods.gisp"):
        subnetworks = list(run_method(model, None, "gisp", [0.2, 0.4], options, calibration, work_dir=work))
    assert "does not continue this schedule" in caplog.text
    assert [s.target for s in subnetworks] == [0.2, 0.4]
    assert json.loads(path.read_text())["trajectory"]["steps"][-1]["target"] == 0.4  # rewritten by the fresh run
