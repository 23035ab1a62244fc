"""GISP: scores against plain autograd, normalisation, protection, schedule, nesting, resume, errors."""

import copy
import json
import logging

import pytest
import torch

from gisp_plugin.adapters.api import adapter_for
from gisp_plugin.anatomy.structures import KeepMask
from gisp_plugin.checkpoint.trajectory import Trajectory
from gisp_plugin.data.api import CalibrationSet
from gisp_plugin.importance.allocation import prune_lowest_globally
from gisp_plugin.importance.gradients import NonFiniteError
from gisp_plugin.masking.masked_model import MaskedModel
from gisp_plugin.methods import gisp
from gisp_plugin.methods.gisp import GispOptions, protected_layers, step_scores
from gisp_plugin.methods.options import OptionError
from gisp_plugin.pruning import TargetError, resolve_method, run_method
from tests.tiny import random_ids, tiny_model


def calibration_set(n: int = 6, seed: int = 1) -> CalibrationSet:
    ids = random_ids(n, 16, seed=seed)
    return CalibrationSet("random", [ids[i, : 10 + i] for i in range(n)])


def some_pruned(model, anatomy) -> KeepMask:
    """Prune a few heads and channels; under GQA, every reader of key/value group 0 in layer 1."""
    keep = KeepMask.dense(anatomy)
    heads = keep[1, "attn_head"].clone()
    kind = anatomy.kind(1, "attn_head")
    group = kind.dependents[0].readers[0] if kind.dependents else (0, 1)
    heads[list(group)] = False
    keep[1, "attn_head"] = heads
    channels = keep[0, "mlp_channel"].clone()
    channels[[2, 5, 11]] = False
    keep[0, "mlp_channel"] = channels
    return keep


def independent_scores(family: str, keep: KeepMask, calibration: CalibrationSet):
    """Per-unit sum |W * g| by plain autograd on a fresh model whose pruned slices are zeroed by hand."""
    model = tiny_model(family)
    config = model.config
    d = model.model.layers[0].self_attn.head_dim  # published Qwen2 configs set no head_dim
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    group = n_heads // n_kv
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            for h in (~keep[i, "attn_head"]).nonzero().flatten().tolist():
                rows = slice(h * d, (h + 1) * d)
                attn.q_proj.weight[rows] = 0
                attn.o_proj.weight[:, rows] = 0
                if attn.q_proj.bias is not None:
                    attn.q_proj.bias[rows] = 0
            for j in range(n_kv):
                if (
                    n_kv == n_heads
                    and keep[i, "attn_head"][j]
                    or n_kv < n_heads
                    and keep[i, "attn_head"][j * group : (j + 1) * group].any()
                ):
                    continue
                for proj in (attn.k_proj, attn.v_proj):
                    proj.weight[j * d : (j + 1) * d] = 0
                    if proj.bias is not None:
                        proj.bias[j * d : (j + 1) * d] = 0
            for c in (~keep[i, "mlp_channel"]).nonzero().flatten().tolist():
                mlp.gate_proj.weight[c] = 0
                mlp.up_proj.weight[c] = 0
                mlp.down_proj.weight[:, c] = 0
    n = len(calibration)
    for seq in calibration.sequences:
        (model(seq[None], labels=seq[None]).loss / n).backward()
    scores = {}
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp

        def s(linear):
            return (linear.weight * linear.weight.grad).abs().double()

        heads = []
        for h in range(n_heads):
            rows = slice(h * d, (h + 1) * d)
            total = s(attn.q_proj)[rows].sum() + s(attn.o_proj)[:, rows].sum()
            if n_kv == n_heads:  # plain multi-head attention: the head owns its k/v rows too
                total += s(attn.k_proj)[rows].sum() + s(attn.v_proj)[rows].sum()
            heads.append(total)
        scores[i, "attn_head"] = torch.stack(heads)
        channels = [
            s(mlp.gate_proj)[c].sum() + s(mlp.up_proj)[c].sum() + s(mlp.down_proj)[:, c].sum()
            for c in range(config.intermediate_size)
        ]
        scores[i, "mlp_channel"] = torch.stack(channels)
    return scores


def test_scores_match_plain_autograd_on_explicit_slices(family):
    model = tiny_model(family)
    anatomy = adapter_for(model).anatomy(model)
    calibration = calibration_set()
    keep = some_pruned(model, anatomy)
    with MaskedModel(model, anatomy) as masked:
        masked.apply(keep)
        raw, sums = step_scores(model, anatomy, calibration, GispOptions(batch_size=4))
    expected = independent_scores(family, keep, calibration)
    assert sums.n_samples == len(calibration)
    if family != "llama":  # GQA: a unit is a query head
        assert anatomy.kind(0, "attn_head").count == model.config.num_attention_heads > model.config.num_key_value_heads
    for key, values in expected.items():
        assert raw[key].shape == values.shape
        torch.testing.assert_close(raw[key], values, rtol=1e-4, atol=1e-9)
        assert torch.all(raw[key][~keep[key]] == 0), key  # pruned units score exactly zero
        assert torch.all(raw[key][keep[key]] > 0), key


def test_normalisations_follow_method_md():
    model = tiny_model("mistral")
    anatomy = adapter_for(model).anatomy(model)
    raw = {key: torch.rand(anatomy.kind(*key).count, dtype=torch.float64) + 0.1 for key in anatomy.units()}
    live = KeepMask.dense(anatomy)
    reference = gisp.normalize_scores(model, anatomy, raw, "reference", live, [])
    hidden, head_dim, channels = 48, 8, 32
    torch.testing.assert_close(reference[0, "attn_head"], raw[0, "attn_head"] / (4 * head_dim * hidden))
    torch.testing.assert_close(reference[2, "mlp_channel"], raw[2, "mlp_channel"] / (3 * channels))
    per_param = gisp.normalize_scores(model, anatomy, raw, "param_mean", live, [])
    torch.testing.assert_close(per_param[1, "attn_head"], raw[1, "attn_head"] / (2 * head_dim * hidden))
    torch.testing.assert_close(per_param[1, "mlp_channel"], raw[1, "mlp_channel"] / (3 * hidden))
    # block_mean: the mean over live units of unprotected layers becomes 1 for each block type
    live[0, "mlp_channel"] = torch.arange(channels) % 2 == 0
    block = gisp.normalize_scores(model, anatomy, raw, "block_mean", live, [2])
    pooled = torch.cat([block[0, "mlp_channel"][live[0, "mlp_channel"]], block[1, "mlp_channel"]])
    assert float(pooled.mean()) == pytest.approx(1.0)
    assert gisp.normalize_scores(model, anatomy, raw, "none", live, []) == raw


def test_protected_layers_parse_and_validate():
    assert protected_layers(32, "reference") == [0, 1, 2, 31]
    assert protected_layers(30, "reference") == [0, 1, 2, 29]
    assert protected_layers(3, "reference") == [2]
    assert protected_layers(30, "none") == []
    assert protected_layers(30, "0-2,29") == [0, 1, 2, 29]
    assert protected_layers(30, [4, 1]) == [1, 4]
    with pytest.raises(ValueError, match="layer 30 does not exist"):
        protected_layers(30, "0,30")
    with pytest.raises(OptionError, match="layer indices such as 0,1,2,29"):
        resolve_method("gisp", {"protect": "first"})
    with pytest.raises(LookupError, match="unknown loss 'mse'; available: answer_ntp, margin, ntp"):
        resolve_method("gisp", {"loss": "mse"})


@pytest.mark.parametrize("protect", ["reference", "0", "none"])
def test_protected_layers_are_never_pruned(protect):
    model = tiny_model("qwen2")
    anatomy = adapter_for(model).anatomy(model)
    protected = protected_layers(3, protect)
    top = 0.6 if protect != "none" else 0.8
    trajectory = Trajectory()
    subnetworks = list(
        run_method(model, None, "gisp", [top], {"steps": "3", "protect": protect}, calibration_set(), trajectory=trajectory)
    )
    assert abs(subnetworks[0].sparsity - top) < 0.02
    for step in range(len(trajectory.steps)):
        keep = trajectory.keep_at(step)
        for layer in protected:
            assert all(bool(keep[layer, kind].all()) for kind in anatomy.kind_names)
    if protect == "reference":
        with pytest.raises(TargetError, match="above what the prunable layers can give"):
            next(run_method(model, None, "gisp", [0.7], {"protect": protect}, calibration_set()))


def _cuts(targets, steps, schedule="linear") -> list[tuple[int, float, float | None]]:
    """(gradient step, scheduled sparsity, target) of every cut a GISP run makes, read from its trajectory."""
    trajectory = Trajectory()
    options = {"steps": str(steps), "protect": "none", "schedule": schedule}
    list(run_method(tiny_model("llama", layers=4), None, "gisp", targets, options, calibration_set(), trajectory=trajectory))
    return [(s["gradient_step"], round(s["scheduled"], 12), s["target"]) for s in trajectory.steps]


def test_a_run_cuts_at_every_target_and_one_shot_is_one_step():
    assert _cuts([0.3, 0.4, 0.5], 1) == [(0, 0.3, 0.3), (0, 0.4, 0.4), (0, 0.5, 0.5)]
    assert _cuts([0.3, 0.4, 0.5], 4) == [
        (0, 0.125, None),
        (1, 0.25, None),
        (2, 0.3, 0.3),
        (2, 0.375, None),
        (3, 0.4, 0.4),
        (3, 0.5, 0.5),
    ]
    cuts = _cuts([0.25, 0.5], 4)
    assert [c[2] for c in cuts if c[2]] == [0.25, 0.5] and len(cuts) == 4  # a target on a step end: no duplicate
    cosine = _cuts([0.3, 0.4, 0.5], 4, "cosine")  # cosine ends ~0.073, 0.25, 0.427, 0.5
    assert [(step, target) for step, _, target in cosine if target] == [(2, 0.3), (2, 0.4), (3, 0.5)]
    assert sorted(c[1] for c in cosine) == [c[1] for c in cosine]


def test_schedule_hits_every_target_with_nested_subnetworks(family):
    model = tiny_model(family, layers=4)
    anatomy = adapter_for(model).anatomy(model)
    targets = [0.15, 0.3, 0.45]
    trajectory = Trajectory()
    subnetworks = list(
        run_method(model, None, "gisp", targets, {"steps": "4", "protect": "none"}, calibration_set(), trajectory=trajectory)
    )
    largest = max(
        k.params_per_unit + sum(d.params_per_unit for d in k.dependents) for layer in anatomy.layers for k in layer.kinds.values()
    )
    assert [s.target for s in subnetworks] == targets
    for subnetwork in subnetworks:
        assert abs(subnetwork.sparsity - subnetwork.target) <= largest / anatomy.dense_params
    for smaller, larger in zip(subnetworks, subnetworks[1:], strict=False):
        assert larger.keep.is_subset_of(smaller.keep)
    assert [s["gradient_step"] for s in trajectory.steps] == [0, 1, 1, 2, 2, 3]  # ends 0.1125, 0.225, 0.3375, 0.45
    assert [s["target"] for s in trajectory.steps if s["target"]] == targets
    sparsities = [s["sparsity"] for s in trajectory.steps]
    assert sparsities == sorted(sparsities)


def test_steps_smaller_than_a_unit_never_bring_a_pruned_unit_back():
    """60 steps to 0.5 on a tiny Llama: a step's target is then less than half an MLP channel above the last,
    and the prefix closest to it ended one entry short of everything already pruned (a pruned channel came back:
    "step 29 keeps a structure pruned at an earlier step"). Every step's subnetwork stays inside the last one."""
    model = tiny_model("llama")
    trajectory = Trajectory()
    subnetworks = list(run_method(model, None, "gisp", [0.2, 0.5], {"steps": "60"}, calibration_set(), trajectory=trajectory))
    assert [s.target for s in subnetworks] == [0.2, 0.5]
    steps = [trajectory.keep_at(i) for i in range(len(trajectory.steps))]
    assert all(later.is_subset_of(earlier) for earlier, later in zip(steps, steps[1:], strict=False))


def test_iterative_steps_rescore_on_the_masked_model():
    """Step i's ranking comes from gradients of the model masked at step i - 1; steps=1 cuts one ranking."""
    model = tiny_model("llama", layers=4)
    anatomy = adapter_for(model).anatomy(model)
    calibration = calibration_set()
    options = GispOptions(steps=1, protect="none")
    raw, _ = step_scores(model, anatomy, calibration, options)
    dense = KeepMask.dense(anatomy)
    ranked = gisp.ranking_scores(anatomy, gisp.normalize_scores(model, anatomy, raw, "reference", dense, []), dense, [])
    one_shot = list(run_method(model, None, "gisp", [0.2, 0.4], {"steps": "1", "protect": "none"}, calibration))
    for subnetwork in one_shot:
        assert subnetwork.keep == prune_lowest_globally(anatomy, ranked, subnetwork.target)
    two = list(run_method(model, None, "gisp", [0.2, 0.4], {"steps": "2", "protect": "none"}, calibration))
    with MaskedModel(model, anatomy) as masked:
        masked.apply(two[0].keep)
        raw_at_20, _ = step_scores(model, anatomy, calibration, options)
    live = two[0].keep
    ranked_at_20 = gisp.ranking_scores(anatomy, gisp.normalize_scores(model, anatomy, raw_at_20, "reference", live, []), live, [])
    assert two[1].keep == prune_lowest_globally(anatomy, ranked_at_20, 0.4)
    changed = [not torch.allclose(raw_at_20[key][live[key]], raw[key][live[key]], rtol=1e-3) for key in raw]
    assert any(changed)  # the second step's scores are not the dense model's


def test_resume_after_interruption_equals_an_uninterrupted_run(tmp_path, monkeypatch, caplog):
    model = tiny_model("mistral", layers=4)
    calibration = calibration_set()
    options = {"steps": "4", "protect": "none"}
    targets = [0.2, 0.4]  # cuts at 0.1, 0.2 (first target), 0.3, 0.4
    full = Trajectory()
    uninterrupted = list(run_method(model, None, "gisp", targets, options, calibration, trajectory=full))

    # interruption 1: the consumer stops after the first target (2 of 4 steps done)
    work = tmp_path / "work"
    run = run_method(model, None, "gisp", targets, options, calibration, work_dir=work)
    next(run)
    run.close()
    assert len(json.loads((work / gisp.STATE_FILE).read_text())["trajectory"]["steps"]) == 2

    # interruption 2: a crash inside the gradient pass of step 4
    calls = []
    real = gisp.accumulate_gradients

    def crash_on_second_call(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(gisp, "accumulate_gradients", crash_on_second_call)
    with caplog.at_level(logging.INFO, logger="gisp_plugin.methods.gisp"), pytest.raises(KeyboardInterrupt):
        list(run_method(model, None, "gisp", targets, options, calibration, work_dir=work))
    assert "resuming" in caplog.text and "after 2 of 4 steps" in caplog.text
    assert not any("parametrizations" in name for name, _ in model.named_parameters())  # left dense
    monkeypatch.setattr(gisp, "accumulate_gradients", real)

    resumed_trajectory = Trajectory()
    resumed = list(run_method(model, None, "gisp", targets, options, calibration, work_dir=work, trajectory=resumed_trajectory))
    assert [s.keep for s in resumed] == [s.keep for s in uninterrupted]
    assert len(resumed_trajectory.steps) == len(full.steps) == 4
    for step in range(4):
        assert resumed_trajectory.keep_at(step) == full.keep_at(step)
    assert [s["loss"] for s in resumed_trajectory.steps] == pytest.approx([s["loss"] for s in full.steps], rel=1e-6)


def test_state_of_another_run_is_ignored(tmp_path, caplog):
    model = tiny_model("llama")
    calibration = calibration_set()
    work = tmp_path / "work"
    list(run_method(model, None, "gisp", [0.2], {"steps": "2"}, calibration, work_dir=work))
    with caplog.at_level(logging.WARNING, logger="gisp_plugin.methods.gisp"):
        other = list(run_method(model, None, "gisp", [0.2], {"steps": "2", "normalize": "none"}, calibration, work_dir=work))
    assert "from a different run" in caplog.text
    assert other[0].info["gradient_step"] == 1
    state = json.loads((work / gisp.STATE_FILE).read_text())
    assert len(state["trajectory"]["steps"]) == 2


def test_non_finite_gradients_stop_the_run_and_leave_the_model_dense():
    model = tiny_model("llama")
    with torch.no_grad():  # finite weights whose activations overflow: the loss is what turns inf
        model.model.layers[1].input_layernorm.weight.fill_(3e38)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(NonFiniteError, match="gisp step 1/2 at sparsity 0.0000: calibration loss is not finite"):
        list(run_method(model, None, "gisp", [0.2], {"steps": "2"}, calibration_set()))
    with torch.no_grad():  # an inf weight is refused by the pruning loop before any step
        model.model.layers[1].self_attn.v_proj.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="weight model.layers.1.self_attn.v_proj.weight holds inf or NaN"):
        list(run_method(model, None, "gisp", [0.2], {"steps": "2"}, calibration_set()))
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight[0, 0] = before["model.layers.1.self_attn.v_proj.weight"][0, 0]
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_loss_option_selects_the_objective():
    from tests.importance.test_losses import multiple_choice_set

    model = tiny_model("qwen2")
    choices = multiple_choice_set()
    margin = next(run_method(model, None, "gisp", [0.2], {"steps": "1", "loss": "margin"}, choices))
    ntp = next(run_method(model, None, "gisp", [0.2], {"steps": "1", "loss": "ntp"}, choices))
    assert abs(margin.info["calibration_loss"]) < 1.0 < ntp.info["calibration_loss"]  # mean(pos) - mean(neg) vs mean CE
    with pytest.raises(ValueError, match="loss 'margin' needs multiple-choice data"):
        next(run_method(model, None, "gisp", [0.2], {"loss": "margin"}, calibration_set()))
