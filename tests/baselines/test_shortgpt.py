"""ShortGPT: Block Influence against a hand computation, layer removal masked, compacted, saved and reloaded.

The independent computation runs plain transformers forwards with ``output_hidden_states=True`` on one
unpadded sequence at a time (the final norm replaced by the identity, so the last entry is the last
layer's own output) and takes torch's ``cosine_similarity`` token by token.
"""

import copy

import pytest
import torch
from gisp_baselines.shortgpt import BlockInfluence, block_influence, layers_for_target, without_layers
from torch import nn
from transformers import AutoModelForCausalLM

from gisp_plugin.adapters.api import adapter_for
from gisp_plugin.anatomy.structures import KeepMask
from gisp_plugin.checkpoint.saving import count_params, load_pruned, save_pruned
from gisp_plugin.checkpoint.trajectory import Trajectory
from gisp_plugin.data.api import CalibrationSet
from gisp_plugin.masking.masked_model import MaskedModel
from gisp_plugin.plugins.manager import registered
from gisp_plugin.pruning import TargetError, compact_subnetwork, run_method
from tests.tiny import FAMILIES, random_ids, record_for, tiny_model

# Qwen-MoE configs that mix dense and expert layers by index: removal must keep each layer's kind
MIXED = [("qwen2_moe", {"decoder_sparse_step": 2}), ("qwen3_moe", {"mlp_only_layers": [0, 3]})]


def ragged_calibration(n: int = 5, seed: int = 0) -> CalibrationSet:
    """Sequences of different lengths, so batches carry padding."""
    generator = torch.Generator().manual_seed(seed)
    return CalibrationSet("ids", [torch.randint(3, 320, (8 + 3 * i,), generator=generator) for i in range(n)])


def influence_by_hand(model, calibration: CalibrationSet) -> torch.Tensor:
    """BI per layer from ``output_hidden_states``, one unpadded sequence at a time, float64 ``[layers]``."""
    plain = copy.deepcopy(model)
    plain.model.norm = nn.Identity()  # hidden_states[-1] is the normed output otherwise
    layers = len(plain.model.layers)
    cosine_sum, tokens = torch.zeros(layers, dtype=torch.float64), 0
    with torch.no_grad():
        for ids in calibration.sequences:
            hidden = plain(ids[None], output_hidden_states=True).hidden_states  # layers + 1 of [1, seq, hidden]
            for i in range(layers):
                cosine_sum[i] += torch.cosine_similarity(hidden[i][0], hidden[i + 1][0], dim=-1).double().sum()
            tokens += len(ids)
    return 1 - cosine_sum / tokens


def deleted(model, layers: list[int]):
    """A copy of ``model`` with decoder ``layers`` deleted the plain way (renumbered, per-layer config cut)."""
    out = copy.deepcopy(model)
    kept = [i for i in range(len(out.model.layers)) if i not in layers]
    out.model.layers = nn.ModuleList([out.model.layers[i] for i in kept])
    for new, layer in enumerate(out.model.layers):
        layer.self_attn.layer_idx = new
    if getattr(out.config, "layer_types", None):
        out.config.layer_types = [out.config.layer_types[i] for i in kept]
    out.config.num_hidden_layers = len(kept)
    return out


def removed(anatomy, layers: list[int]) -> KeepMask:
    return without_layers(anatomy, layers)


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3", "mixtral", "qwen2_moe"])
def test_block_influence_matches_hand_computation(family):
    model = tiny_model(family, layers=4)
    calibration = ragged_calibration()
    got = block_influence(model, model.model.layers, calibration, batch_size=3, pad_id=2).scores
    torch.testing.assert_close(got, influence_by_hand(model, calibration), rtol=0, atol=1e-5)


def test_block_influence_sums_merge_across_batches_and_ranks():
    model = tiny_model("llama", layers=3)
    calibration = ragged_calibration(6)
    whole = block_influence(model, model.model.layers, calibration, batch_size=2)
    halves = [CalibrationSet("ids", calibration.sequences[:2]), CalibrationSet("ids", calibration.sequences[2:])]
    first, second = (block_influence(model, model.model.layers, part, batch_size=4) for part in halves)
    first.merge(second)
    assert torch.equal(first.tokens, whole.tokens)
    torch.testing.assert_close(first.scores, whole.scores, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="cannot merge"):
        first.merge(BlockInfluence(4))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_masked_layer_is_the_identity(family):
    """Zeroing a layer's output projections computes the model with that layer deleted."""
    model = tiny_model(family, layers=3)
    anatomy = adapter_for(model).anatomy(model)
    ids = random_ids(2, 20)  # longer than the sliding windows
    for layer in range(3):
        with MaskedModel(model, anatomy) as masked, torch.no_grad():
            masked.apply(removed(anatomy, [layer]))
            got = model(ids).logits
        with torch.no_grad():
            expected = deleted(model, [layer])(ids).logits
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("family", "overrides"), [(family, {}) for family in FAMILIES] + MIXED)
def test_compacted_model_without_layers_equals_masked(family, overrides):
    """Layers 1 and 2 of 4 removed, heads and channels of the others pruned at random: same logits, same
    tokens generated with the key/value cache, exactly the parameters the anatomy counts."""
    model = tiny_model(family, layers=4, **overrides)
    adapter = adapter_for(model)
    anatomy = adapter.anatomy(model)
    generator = torch.Generator().manual_seed(1)
    keep = removed(anatomy, [1, 2])
    for key in [key for key in keep.flags if key[1] != "layer"]:
        keep[key] = torch.rand(keep[key].shape, generator=generator) < 0.7
    ids, prompt = random_ids(2, 20), random_ids(1, 6, 5)
    with MaskedModel(model, anatomy) as masked, torch.no_grad():
        masked.apply(keep)
        expected = model(ids).logits
        expected_tokens = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False)
    compact = adapter.compact(model, keep, {})
    assert len(compact.model.layers) == compact.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in compact.model.layers] == [0, 1]
    assert compact.config.removed_layers == [1, 2]
    if getattr(model.config, "layer_types", None):
        assert compact.config.layer_types == [model.config.layer_types[0], model.config.layer_types[3]]
    with torch.no_grad():
        torch.testing.assert_close(compact(ids).logits, expected, rtol=1e-5, atol=1e-5)
    got_tokens = compact.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False)
    assert torch.equal(got_tokens, expected_tokens)
    dense_decoder = count_params(model)["decoder"]
    assert count_params(compact)["decoder"] == anatomy.params_kept(keep)
    assert anatomy.sparsity(keep) == 1 - count_params(compact)["decoder"] / dense_decoder


@pytest.mark.parametrize(("family", "overrides"), [("gemma3", {}), MIXED[0]])
def test_saved_model_without_layers_reloads_with_plain_transformers(tmp_path, tokenizer, family, overrides):
    model = tiny_model(family, layers=4, **overrides)
    adapter = adapter_for(model)
    anatomy = adapter.anatomy(model)
    keep = removed(anatomy, [0, 2])
    compact = adapter.compact(model, keep, {})
    folder = save_pruned(compact, tokenizer, tmp_path / "pruned", record_for(compact, anatomy, keep))
    ids = random_ids(2, 20)
    with torch.no_grad():
        expected = compact(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
        torch.testing.assert_close(plain(ids).logits, expected, rtol=1e-5, atol=1e-5)  # default attention: sdpa
        torch.testing.assert_close(load_pruned(folder)(ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert plain.config.num_hidden_layers == 2 and plain.config.removed_layers == [0, 2]


def test_removing_every_layer_is_refused():
    model = tiny_model("llama", layers=3)
    adapter = adapter_for(model)
    anatomy = adapter.anatomy(model)
    with pytest.raises(ValueError, match="every one of the 3 decoder layers is removed"):
        adapter.compact(model, removed(anatomy, [0, 1, 2]), {})
    with pytest.raises(TargetError, match="above what the prunable layers can give"):
        list(run_method(model, None, "shortgpt", [0.9], calibration=ragged_calibration()))


def test_a_bias_inside_a_removed_layer_is_refused():
    model = tiny_model("llama", layers=3)
    anatomy = adapter_for(model).anatomy(model)
    bias = {"model.layers.1.mlp.down_proj": torch.ones(model.config.hidden_size)}
    with MaskedModel(model, anatomy) as masked, pytest.raises(ValueError, match="inside a removed layer"):
        masked.apply(removed(anatomy, [1]), bias)


def test_keep_mask_and_trajectory_record_removed_layers():
    model = tiny_model("llama", layers=3)
    anatomy = adapter_for(model).anatomy(model)
    keep = removed(anatomy, [1])
    assert keep.removed_layers() == [1] and not keep.layer_kept(1) and keep.layer_kept(0)
    assert keep.to_json()["1"]["layer"] == [0]
    assert KeepMask.from_json(anatomy, keep.to_json()) == keep
    assert KeepMask.dense(anatomy, layers=True) == KeepMask.dense(anatomy)  # no flag means kept
    assert KeepMask.dense(anatomy).is_subset_of(keep) is False and keep.is_subset_of(KeepMask.dense(anatomy))
    assert anatomy.whole_layer(1).params_per_unit == anatomy.layers[1].dense_params
    trajectory = Trajectory()
    trajectory.record(keep, anatomy.sparsity(keep))
    trajectory.record(removed(anatomy, [1, 0]), anatomy.sparsity(removed(anatomy, [1, 0])))
    loaded = Trajectory.from_json(trajectory.to_json(), anatomy)
    assert loaded.keep_at(0) == keep and loaded.keep_at(1).removed_layers() == [0, 1]


def test_target_picks_the_layer_count_closest_in_parameters():
    """Dense and expert layers differ in size: the count is chosen by parameters, not by layers."""
    model = tiny_model("qwen3_moe", layers=4, mlp_only_layers=[0, 3])
    anatomy = adapter_for(model).anatomy(model)
    sizes = [layer.dense_params for layer in anatomy.layers]
    assert len(set(sizes)) == 2
    order = [1, 0, 2]
    for target in (0.05, 0.2, 0.3, 0.45, 0.6, 0.75):
        reached = [sum(sizes[i] for i in order[:count]) / sum(sizes) for count in range(4)]
        best = min(range(4), key=lambda count: (abs(reached[count] - target), count))
        assert layers_for_target(anatomy, order, target) == best


@pytest.mark.parametrize("iterative", [False, True])
def test_shortgpt_removes_the_lowest_influence_layers_nested(iterative):
    model = tiny_model("llama", layers=5)
    anatomy = adapter_for(model).anatomy(model)
    calibration = ragged_calibration()
    trajectory = Trajectory()
    options = {"iterative": str(iterative), "batch_size": "2"}
    subs = list(run_method(model, None, "shortgpt", [0.2, 0.4, 0.6], options, calibration=calibration, trajectory=trajectory))
    # the expected order, by hand: once on the dense model, or again on the model without the layers so far
    order: list[int] = []
    while len(order) < 3:
        current = deleted(model, order)
        scores = influence_by_hand(current, calibration)
        kept = [i for i in range(5) if i not in order]
        ranking = [kept[j] for j in torch.sort(scores, stable=True).indices.tolist()]
        order += ranking[: 3 - len(order)] if not iterative else ranking[:1]
    assert [sub.keep.removed_layers() for sub in subs] == [sorted(order[:1]), sorted(order[:2]), sorted(order[:3])]
    assert [step["removed_layer"] for step in trajectory.steps] == order
    for sub in subs:
        assert sub.sparsity == pytest.approx(1 - anatomy.params_kept(sub.keep) / anatomy.dense_params)
        assert abs(sub.sparsity - sub.target) < 0.01  # 5 equal layers: 0.2, 0.4, 0.6 exactly
        compact, params = compact_subnetwork(model, sub)
        assert params["decoder"] == anatomy.params_kept(sub.keep)
    assert subs[0].keep.is_subset_of(KeepMask.dense(anatomy)) and subs[2].keep.is_subset_of(subs[1].keep)


def test_shortgpt_is_an_entry_point_plugin():
    entry = registered("method")["shortgpt"]
    assert entry.plugin == "shortgpt"
    assert entry.item.run.__module__ == "gisp_baselines.shortgpt"
    assert entry.item.nested
