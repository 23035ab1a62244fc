"""Compacted models compute exactly what the masked model computes, for many random mask patterns."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gisp_plugin.adapters.api import adapter_for
from gisp_plugin.anatomy.structures import KeepMask
from gisp_plugin.checkpoint.saving import count_params
from gisp_plugin.compaction.modeling_gisp_pruned import GatheredLinear
from gisp_plugin.masking.masked_model import MaskedModel
from tests.tiny import EAGER_ONLY, FAMILIES, random_ids, random_keep, tiny_model

CASES = [(family, attn) for family in FAMILIES for attn in ("eager", "sdpa") if attn == "eager" or family not in EAGER_ONLY]
MODELS = {(family, attn): tiny_model(family, attn=attn) for family, attn in CASES}
# The property test keeps one masked copy of every model for all its examples: putting masks on and
# taking them off again costs more than the forward passes.
MASKED = {case: MaskedModel(tiny_model(case[0], attn=case[1]), adapter_for(MODELS[case]).anatomy(MODELS[case])) for case in CASES}


def random_biases(model, seed: int, layers: list[int]) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    hidden = model.config.hidden_size
    out = {}
    linears = {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    for i in layers:
        for path in ("self_attn.o_proj", "mlp.down_proj", "mlp.shared_expert.down_proj"):  # where the layer has them
            if f"model.layers.{i}.{path}" in linears:
                out[f"model.layers.{i}.{path}"] = torch.randn(hidden, generator=generator)
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    attn=st.sampled_from(["eager", "sdpa"]),
    seed=st.integers(0, 10_000),
    p_keep=st.sampled_from([0.1, 0.4, 0.7, 0.95]),
    empty_layer=st.sampled_from([None, 0, 1, 2]),
    empty_kind=st.sampled_from(["attn_head", "mlp_channel", "expert_channel", "shared_channel"]),
    p_expert_out=st.sampled_from([0.0, 0.5, 1.0]),
    bias_layers=st.sampled_from([[], [0], [1, 2]]),
)
def test_compacted_equals_masked(family, attn, seed, p_keep, empty_layer, empty_kind, p_expert_out, bias_layers):
    """200 random masks per family: empty blocks, uneven GQA groups, whole experts removed, experts
    with few channels; output biases added to any layer."""
    masked = MASKED[family, "eager" if family in EAGER_ONLY else attn]
    model, anatomy = masked.model, masked.anatomy
    adapter = adapter_for(model)
    keep = random_keep(anatomy, seed, p_keep, empty_layer, empty_kind, p_expert_out)
    biases = random_biases(model, seed, bias_layers)
    ids = random_ids(2, 10, seed)
    masked.apply(keep, biases)
    with torch.no_grad():
        expected = model(ids).logits
        compact = adapter.compact(model, keep, biases)
        got = compact(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert count_params(compact)["decoder"] == anatomy.params_kept(keep) + _added_bias_params(model, biases)


def _added_bias_params(model, biases: dict[str, torch.Tensor]) -> int:
    """Extra biases only add parameters where the dense projection had no bias of its own."""
    return sum(b.numel() for path, b in biases.items() if model.get_submodule(path).bias is None)


def _keep_heads(anatomy, heads_per_layer: dict[int, list[int]]) -> KeepMask:
    keep = KeepMask.dense(anatomy)
    for layer, heads in heads_per_layer.items():
        flags = torch.zeros(anatomy.kind(layer, "attn_head").count, dtype=torch.bool)
        flags[heads] = True
        keep[layer, "attn_head"] = flags
    return keep


@pytest.mark.parametrize("case", [("mistral", "eager"), ("mistral", "sdpa"), ("phi4mini", "eager"), ("phi4mini", "sdpa")])
def test_uneven_gqa_groups_repeat_key_value_rows(case):
    """Mistral (separate k/v) and Phi-4-mini (fused qkv), 8 and 6 query heads over 2 kv heads."""
    model = MODELS[case]
    adapter = adapter_for(model)
    anatomy = adapter.anatomy(model)
    group = anatomy.kind(0, "attn_head").count // 2
    # layer 0: kv head 0 serves 3 query heads, kv head 1 one; layer 1: equal groups of 2; layer 2: one kv head
    keep = _keep_heads(anatomy, {0: [0, 1, 2, group], 1: [0, 1, group, group + 1], 2: [group + 1, group + 2]})
    compact = adapter.compact(model, keep, {})
    attns = [layer.self_attn for layer in compact.model.layers]
    kv_projection = "qkv_proj" if case[0] == "phi4mini" else "k_proj"
    assert [isinstance(getattr(a, kv_projection), GatheredLinear) for a in attns] == [True, False, False]
    assert [a.num_key_value_groups for a in attns] == [1, 2, 2]
    assert [a.num_key_value_heads for a in attns] == [4, 2, 1]
    ids = random_ids(2, 20)  # longer than the sliding window (16)
    with MaskedModel(model, anatomy) as masked, torch.no_grad():
        masked.apply(keep)
        torch.testing.assert_close(compact(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_generate_same_tokens_with_kv_cache(case):
    model = MODELS[case]
    adapter = adapter_for(model)
    anatomy = adapter.anatomy(model)
    keep = random_keep(anatomy, 3, 0.6, empty_layer=0, empty_kind="attn_head")  # layer 0 without attention
    ids = random_ids(1, 6, 5)
    with MaskedModel(model, anatomy) as masked:
        masked.apply(keep)
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    compact = adapter.compact(model, keep, {})
    got = compact.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    assert torch.equal(got, expected)
    assert got.shape[1] == 18


@pytest.mark.parametrize("family", ["qwen2", "gemma3", "phi4mini"])
def test_bfloat16_compaction_matches_masked(family):
    model = tiny_model(family, attn="sdpa").to(torch.bfloat16)
    adapter = adapter_for(model)
    anatomy = adapter.anatomy(model)
    keep = random_keep(anatomy, 7, 0.5, None, "attn_head")
    ids = random_ids(2, 10)
    with MaskedModel(model, anatomy) as masked, torch.no_grad():
        masked.apply(keep, random_biases(model, 1, [1]))
        expected = model(ids).logits
        compact = adapter.compact(model, keep, masked.extra_biases)
        got = compact(ids).logits
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)


def test_release_restores_dense_model_exactly():
    model = tiny_model("qwen2")
    anatomy = adapter_for(model).anatomy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = random_ids()
    with torch.no_grad():
        dense_logits = model(ids).logits
    with MaskedModel(model, anatomy) as masked:
        masked.apply(random_keep(anatomy, 1, 0.3, 1, "mlp_channel"), random_biases(model, 1, [0]))
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense_logits)


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3", "gemma2"])
def test_padding_mlp_width_keeps_outputs_and_rounds_shapes(family):
    model = MODELS[family, "eager"]
    adapter = adapter_for(model)
    anatomy = adapter.anatomy(model)
    keep = random_keep(anatomy, 11, 0.55, empty_layer=1, empty_kind="mlp_channel")
    ids = random_ids(2, 10, 3)
    compact = adapter.compact(model, keep, {}, 8)
    widths = [layer.mlp.down_proj.in_features for layer in compact.model.layers]
    assert all(w % 8 == 0 for w in widths) and widths[1] == 0
    assert [w - int(keep[i, "mlp_channel"].sum()) for i, w in enumerate(widths)] == [
        (-int(keep[i, "mlp_channel"].sum())) % 8 for i in range(3)
    ]
    with MaskedModel(model, anatomy) as masked, torch.no_grad():
        masked.apply(keep)
        torch.testing.assert_close(compact(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
