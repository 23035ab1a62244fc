"""The perplexity search's prefix replay gives, on every family, the perplexities of full passes.

SLEB and BlockPruner measure each candidate from its first decoder layer on, the layers below replaying one
recorded pass (``PrefixReplay``). The independent computation here masks the model for every candidate the
search tried and runs full calibration passes (``calibration_nll``): the two must agree to float rounding,
step by step, on every tiny family. The replay must also be what ran (no silent fallback to full passes),
and where a hook changes a layer's output, which replaying would apply twice, the search must notice and
fall back. A search saves its removals in the work folder and a rerun resumes after them, computing only
what is left.
"""

import json
import logging

import pytest
import torch
from gisp_baselines.blockpruner import without_blocks
from gisp_baselines.perplexity_search import REPLAY_RTOL, STATE_FILE, calibration_nll
from gisp_baselines.sleb import without_layers

from gisp_plugin.adapters.api import adapter_for
from gisp_plugin.checkpoint.trajectory import Trajectory
from gisp_plugin.masking.masked_model import MaskedModel
from gisp_plugin.pruning import run_method
from tests.baselines.test_shortgpt import ragged_calibration
from tests.tiny import FAMILIES, tiny_model

FALLBACK = "not a plain chain of decoder layers"


def _block(label: str) -> tuple[str, int]:
    name, layer = label.split(":")
    return name, int(layer)


def full_pass_perplexities(model, calibration, trajectory: Trajectory, removed_key: str, parse, without) -> list[dict]:
    """For every step, the perplexity of a full masked pass without each candidate it tried."""
    anatomy = adapter_for(model).anatomy(model)
    removed: list = []
    every = []
    with MaskedModel(model, anatomy) as masked:
        for step in trajectory.steps:
            tried = {}
            for label in step["tried"]:
                masked.apply(without(anatomy, [*removed, parse(label)]))
                tried[label] = calibration_nll(model, calibration, batch_size=3, pad_id=2).perplexity
            every.append(tried)
            removed.append(parse(str(step[removed_key])))
    return every


def _check(trajectory: Trajectory, expected: list[dict]) -> None:
    assert len(trajectory.steps) == len(expected) >= 2
    for step, by_full_pass in zip(trajectory.steps, expected, strict=True):
        assert step["tried"].keys() == by_full_pass.keys()
        for label, value in by_full_pass.items():  # same kernels on the same inputs: equal to float rounding
            assert step["tried"][label] == pytest.approx(value, rel=REPLAY_RTOL), label


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_blockpruner_replay_equals_full_passes(family, caplog):
    model = tiny_model(family, layers=4)
    calibration = ragged_calibration(5)
    trajectory = Trajectory()
    with caplog.at_level(logging.WARNING, logger="gisp_baselines.perplexity_search"):
        list(run_method(model, None, "blockpruner", [0.3], {"batch_size": 3}, calibration, trajectory=trajectory))
    assert FALLBACK not in caplog.text  # the replay ran, it was not replaced by full passes
    _check(trajectory, full_pass_perplexities(model, calibration, trajectory, "removed_block", _block, without_blocks))


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen2_moe"])
def test_sleb_replay_equals_full_passes(family, caplog):
    model = tiny_model(family, layers=5)
    calibration = ragged_calibration(5)
    trajectory = Trajectory()
    options = {"batch_size": 3, "early_barrier": 0, "latter_barrier": 0}
    with caplog.at_level(logging.WARNING, logger="gisp_baselines.perplexity_search"):
        list(run_method(model, None, "sleb", [0.4], options, calibration, trajectory=trajectory))
    assert FALLBACK not in caplog.text
    _check(trajectory, full_pass_perplexities(model, calibration, trajectory, "removed_layer", int, without_layers))


def test_a_hook_that_changes_a_layer_output_makes_the_search_run_full_passes(caplog):
    """A steering hook adds a vector to layer 3's output: replaying that output through layer 3 would add
    it twice, so the first step's check fails and every perplexity comes from full passes."""
    model = tiny_model("llama", layers=5)
    steer = 0.5 * torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    model.model.layers[3].register_forward_hook(lambda module, args, output: output + steer)
    calibration = ragged_calibration(5)
    trajectory = Trajectory()
    options = {"batch_size": 3, "early_barrier": 0, "latter_barrier": 0}
    with caplog.at_level(logging.WARNING, logger="gisp_baselines.perplexity_search"):
        list(run_method(model, None, "sleb", [0.4], options, calibration, trajectory=trajectory))
    assert FALLBACK in caplog.text
    _check(trajectory, full_pass_perplexities(model, calibration, trajectory, "removed_layer", int, without_layers))


class ForwardCount:
    """Counts the model's LM-head calls: one per calibration batch of every pass that reaches the logits."""

    def __init__(self, model):
        self.calls = 0
        model.lm_head.register_forward_hook(self)

    def __call__(self, module, args, output):
        self.calls += 1


def test_a_search_resumes_after_its_saved_removals(tmp_path, caplog):
    """A first run stops after two removals (its target); a rerun to a larger target in the same work folder
    takes those two from the saved state (no pass for them) and equals an uninterrupted run."""
    model = tiny_model("llama", layers=6)
    calibration = ragged_calibration(5)  # batch_size 3: two batches per pass
    options = {"batch_size": 3, "early_barrier": 0, "latter_barrier": 0}
    full = Trajectory()
    (expected,) = run_method(model, None, "sleb", [0.5], options, calibration, trajectory=full)

    work = tmp_path / "work"
    list(run_method(model, None, "sleb", [1 / 3], options, calibration, work_dir=work))  # two of six layers
    saved = json.loads((work / STATE_FILE).read_text())["steps"]
    assert [int(s["removed"]) for s in saved] == expected.info["removal_order"][:2]
    count = ForwardCount(model)
    resumed_trajectory = Trajectory()
    with caplog.at_level(logging.INFO, logger="gisp_baselines.perplexity_search"):
        (resumed,) = run_method(model, None, "sleb", [0.5], options, calibration, work_dir=work, trajectory=resumed_trajectory)
    assert "resuming" in caplog.text and "after 2 removals" in caplog.text
    assert resumed.keep == expected.keep and resumed.info == expected.info
    assert resumed_trajectory.steps == full.steps
    # only the third removal was searched: 4 candidates, plus the replay's one check, in 2 batches each
    assert count.calls == (4 + 1) * 2


def test_the_saved_state_of_another_search_is_ignored(tmp_path, caplog):
    model = tiny_model("llama", layers=6)
    calibration = ragged_calibration(5)
    work = tmp_path / "work"
    list(run_method(model, None, "sleb", [1 / 3], {"batch_size": 3}, calibration, work_dir=work))
    other = ragged_calibration(5, seed=1)
    with caplog.at_level(logging.WARNING):
        (again,) = run_method(model, None, "sleb", [1 / 3], {"batch_size": 3}, other, work_dir=work)
    assert "from a different run" in caplog.text
    (fresh,) = run_method(model, None, "sleb", [1 / 3], {"batch_size": 3}, other)
    assert again.info == fresh.info
