"""BlockPruner: every removed block against brute-force calibration perplexity of every candidate.

The independent computation removes a block the plain way, on a copy of the model: an attention block
by zeroing its ``o_proj`` weight, an MLP block by zeroing its ``down_proj`` weight (so the block adds
nothing to the residual stream), and measures perplexity one unpadded sequence at a time
(``test_sleb.perplexity_by_hand``). At each step it tries every block, attention blocks first, and takes
the lowest; the method must choose the same blocks in the same order through its masks.
"""

import copy

import pytest
import torch
from gisp_baselines.blockpruner import BlockPrunerOptions, candidate_blocks, without_blocks

from gisp_plugin.adapters.api import adapter_for
from gisp_plugin.checkpoint.trajectory import Trajectory
from gisp_plugin.masking.masked_model import MaskedModel
from gisp_plugin.methods.api import Subnetwork
from gisp_plugin.pruning import compact_subnetwork, run_method
from tests.baselines.test_shortgpt import ragged_calibration
from tests.baselines.test_sleb import perplexity_by_hand
from tests.tiny import random_ids, tiny_model

OUTPUT = {"attention": "self_attn.o_proj", "mlp": "mlp.down_proj"}


def zeroed(model, blocks: list[tuple[str, int]]):
    """A copy of ``model`` whose ``blocks`` add nothing: their output projection's weight is zero."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, layer in blocks:
            out.model.layers[layer].get_submodule(OUTPUT[name]).weight.zero_()
    return out


def blockpruner_by_brute_force(model, calibration, steps: int, block_type: str = "mix") -> list[str]:
    layers = range(len(model.model.layers))
    blocks = ([("attention", i) for i in layers] if block_type != "mlp" else []) + (
        [("mlp", i) for i in layers] if block_type != "attention" else []
    )
    removed: list[tuple[str, int]] = []
    for _ in range(steps):
        left = [(n, b) for n, b in enumerate(blocks) if b not in removed]
        tried = [(perplexity_by_hand(zeroed(model, [*removed, b]), calibration), n, b) for n, b in left]
        removed.append(min(tried)[2])  # lowest perplexity, then the earlier candidate
    return [f"{name}:{layer}" for name, layer in removed]


@pytest.mark.parametrize(("block_type", "target"), [("mix", 0.45), ("mlp", 0.2)])  # mlp: two of three blocks at most
def test_blockpruner_removes_the_blocks_brute_force_perplexity_chooses(block_type, target):
    model = tiny_model("llama", layers=3)
    calibration = ragged_calibration(4)
    trajectory = Trajectory()
    options = {"block_type": block_type, "batch_size": 3}
    (subnetwork,) = run_method(model, None, "blockpruner", [target], options, calibration, trajectory=trajectory)
    order = subnetwork.info["removal_order"]
    assert order == blockpruner_by_brute_force(model, calibration, len(order), block_type)
    assert [step["removed_block"] for step in trajectory.steps] == order
    assert len(order) >= 2 and abs(subnetwork.sparsity - target) < 0.1


def test_a_layer_without_both_blocks_is_removed_whole_and_compacts():
    model = tiny_model("llama", layers=3)
    anatomy = adapter_for(model).anatomy(model)
    blocks = [("attention", 1), ("mlp", 1), ("mlp", 2)]
    keep = without_blocks(anatomy, blocks)
    assert keep.removed_layers() == [1]
    assert not bool(keep[2, "mlp_channel"].any()) and bool(keep[2, "attn_head"].all())
    ids = random_ids(2, 9)
    with torch.no_grad():
        expected = zeroed(model, blocks)(ids).logits
        with MaskedModel(model, anatomy) as masked:
            masked.apply(keep)
            torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
        compact, params = compact_subnetwork(model, Subnetwork(0.5, keep, anatomy.sparsity(keep)))
        torch.testing.assert_close(compact(ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert compact.config.num_hidden_layers == 2
    assert params["decoder"] == anatomy.params_kept(keep)


def test_candidates_are_attention_blocks_first_then_mlp():
    model = tiny_model("llama", layers=2)
    anatomy = adapter_for(model).anatomy(model)
    assert candidate_blocks(anatomy, "mix") == [("attention", 0), ("attention", 1), ("mlp", 0), ("mlp", 1)]
    assert candidate_blocks(anatomy, "attention") == [("attention", 0), ("attention", 1)]
    with pytest.raises(ValueError, match="block_type must be one of mix, attention, mlp"):
        BlockPrunerOptions(block_type="mha")
