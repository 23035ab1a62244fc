"""SLEB: calibration perplexity against a hand computation, and every removal against brute force.

The independent computation deletes decoder layers the plain way (a copy of the model without them,
``test_shortgpt.deleted``), runs one unpadded sequence at a time and sums torch's cross-entropy; at each
step it tries every allowed layer and takes the lowest perplexity. The method must choose the same layers
in the same order, through its masks and its padded, batched passes.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from gisp_baselines.perplexity_search import CalibrationNll, calibration_nll
from gisp_baselines.sleb import SlebOptions, candidate_layers

from gisp_plugin.checkpoint.trajectory import Trajectory
from gisp_plugin.data.api import CalibrationSet
from gisp_plugin.pruning import TargetError, compact_subnetwork, run_method
from tests.baselines.test_shortgpt import deleted, ragged_calibration
from tests.tiny import random_ids, tiny_model


def perplexity_by_hand(model, calibration: CalibrationSet) -> float:
    """exp(summed next-token NLL / predicted tokens), one unpadded sequence at a time."""
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for ids in calibration.sequences:
            logits = model(ids[None]).logits[0]
            nll += float(F.cross_entropy(logits[:-1].double(), ids[1:], reduction="sum"))
            tokens += len(ids) - 1
    return math.exp(nll / tokens)


def sleb_by_brute_force(model, calibration: CalibrationSet, steps: int, early: int, latter: int) -> tuple[list[int], list[dict]]:
    """The layers removed, in order, and at each step the perplexity without each allowed layer."""
    removed: list[int] = []
    every: list[dict] = []
    for _ in range(steps):
        alive = [i for i in range(len(model.model.layers)) if i not in removed]
        allowed = alive[early : len(alive) - latter]
        tried = {layer: perplexity_by_hand(deleted(model, [*removed, layer]), calibration) for layer in allowed}
        removed.append(min(allowed, key=lambda layer: (tried[layer], layer)))
        every.append(tried)
    return removed, every


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen2_moe"])
def test_calibration_perplexity_matches_hand_computation(family):
    model = tiny_model(family, layers=2)
    calibration = ragged_calibration()
    got = calibration_nll(model, calibration, batch_size=3, pad_id=2).perplexity
    assert got == pytest.approx(perplexity_by_hand(model, calibration), rel=1e-5)  # float32 logits


def test_calibration_sums_merge_across_parts():
    model = tiny_model("llama", layers=2)
    calibration = ragged_calibration(6)
    whole = calibration_nll(model, calibration, batch_size=2)
    merged = CalibrationNll()
    for part in (calibration.sequences[:2], calibration.sequences[2:]):
        merged.merge(calibration_nll(model, CalibrationSet("ids", part), batch_size=4))
    assert merged.tokens == whole.tokens == sum(len(s) - 1 for s in calibration.sequences)
    assert float(merged.nll_sum) == pytest.approx(float(whole.nll_sum), rel=1e-6)


@pytest.mark.parametrize(("early", "latter"), [(0, 0), (1, 1)])
def test_sleb_removes_the_layers_brute_force_perplexity_chooses(early, latter):
    model = tiny_model("llama", layers=6)
    calibration = ragged_calibration(4)
    options = {"early_barrier": early, "latter_barrier": latter, "batch_size": 3}
    trajectory = Trajectory()
    # three of six equal layers: 0.5 exactly
    (subnetwork,) = run_method(model, None, "sleb", [0.5], options, calibration, trajectory=trajectory)
    expected, tried = sleb_by_brute_force(model, calibration, 3, early, latter)
    assert subnetwork.info["removal_order"] == expected
    assert subnetwork.keep.removed_layers() == sorted(expected)
    assert subnetwork.sparsity == pytest.approx(0.5)
    assert [step["removed_layer"] for step in trajectory.steps] == expected
    for step, by_hand, layer in zip(trajectory.steps, tried, expected, strict=True):
        assert step["tried"] == pytest.approx({str(k): v for k, v in by_hand.items()}, rel=1e-5)  # float32 logits
        assert step["perplexity"] == pytest.approx(by_hand[layer], rel=1e-5)
    compact, _ = compact_subnetwork(model, subnetwork)
    ids = random_ids(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(compact(ids).logits, deleted(model, expected)(ids).logits, rtol=1e-5, atol=1e-5)


def test_barriers_keep_the_first_and_last_alive_layers():
    assert candidate_layers(6, [], SlebOptions()) == [1, 2, 3, 4]
    assert candidate_layers(6, [1, 4], SlebOptions()) == [2, 3]  # alive 0 2 3 5: the first and last stay
    assert candidate_layers(6, [], SlebOptions(early_barrier=0, latter_barrier=2)) == [0, 1, 2, 3]


def test_targets_beyond_the_barriers_are_refused_before_work():
    model = tiny_model("llama", layers=4)
    with pytest.raises(TargetError, match="above what"):  # 2 of 4 layers at most: 0.5
        next(run_method(model, None, "sleb", [0.6], {}, ragged_calibration(2)))
    with pytest.raises(ValueError, match="early_barrier must be >= 0"):
        SlebOptions(early_barrier=-1)
