"""A hybrid pruned where it follows the pattern: Qwen3-Next's MLPs and experts, its token mixers kept whole.

Qwen3-Next interleaves gated-delta-net (linear attention) layers with gated full attention, neither of which the
pattern places; every layer's MLP is routed experts plus a shared expert, which it does. The derived declaration
then prunes the experts only (``DecoderDeclaration.attention is None``): no layer or hidden-channel structure
(the mixers write the residual stream too), the record says what was kept whole. Tiny model from the family's
config class with the fields of Qwen/Qwen3-Next-80B-A3B-Instruct, four layers (three linear, one full).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from gisp_plugin.adapters.api import adapter_for
from gisp_plugin.adapters.self_check import SelfCheckError, self_check
from gisp_plugin.checkpoint.saving import save_pruned
from gisp_plugin.masking.masked_model import MaskedModel
from gisp_plugin.pruning import check_run, run_method
from tests.compaction_check import compact_equal_to_masked
from tests.tiny import random_ids, random_keep, record_for, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen3_next", layers=4)


def test_only_the_experts_are_structures(model):
    adapter = adapter_for(model)
    assert adapter.derived and adapter.declaration.attention is None
    assert "linear_attn" in adapter.declaration.partial
    anatomy = adapter.anatomy(model)
    for layer in anatomy.layers:
        assert set(layer.kinds) == {"expert_channel", "shared_channel"} and layer.whole is None
    assert anatomy.hidden is None
    assert anatomy.dense_params == sum(p.numel() for p in model.model.layers.parameters())


@pytest.mark.parametrize("seed", [0, 1])
def test_compaction_equals_masking_with_the_mixers_whole(model, seed):
    adapter = adapter_for(model)
    anatomy = adapter.anatomy(model)
    keep = random_keep(anatomy, seed, 0.5, empty_layer=seed, empty_kind="expert_channel", p_expert_out=0.3)
    compact_equal_to_masked(model, keep, seed)


def test_the_record_says_the_model_was_pruned_in_part(model, tokenizer):
    (subnetwork,) = run_method(model, tokenizer, "magnitude", [0.2])
    info = subnetwork.info["anatomy"]
    assert info["anatomy"] == "derived" and info["self_check"] == "passed"
    assert "kept whole" in info["pruned_in_part"] and "linear_attn" in info["pruned_in_part"]


def test_layer_removal_is_refused_on_a_model_pruned_in_part(model):
    with pytest.raises(ValueError, match="shortgpt removes whole layers; the qwen3_next anatomy declares none"):
        check_run(model, "shortgpt", [0.3])


def test_falcon_h1_is_pruned_in_its_mlps_and_reloads_with_its_computed_buffers(tmp_path, tokenizer):
    """Falcon-H1 runs a state-space mixer beside the attention in every layer: its MLPs are pruned, and the
    saved model reloads with the mixer's ``mup_vector`` (a non-persistent buffer the model computes at init)."""
    model = tiny_model("falcon_h1", layers=2)
    adapter = adapter_for(model)
    assert adapter.declaration.attention is None and "mamba" in adapter.declaration.partial
    anatomy = adapter.anatomy(model)
    keep = random_keep(anatomy, 0, 0.5, empty_layer=1, empty_kind="mlp_channel")
    ids = random_ids(2, 10)
    with MaskedModel(model, anatomy) as masked, torch.no_grad():
        masked.apply(keep)
        expected = model(ids).logits
    compact = adapter.compact(model, keep)
    folder = save_pruned(compact, tokenizer, tmp_path / "m", record_for(compact, anatomy, keep))
    reloaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(compact(ids).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=1e-5, atol=1e-5)
        want = compact.generate(ids[:1], max_new_tokens=4, do_sample=False)
        assert torch.equal(reloaded.generate(ids[:1], max_new_tokens=4, do_sample=False), want)


def test_the_self_check_says_when_the_family_itself_does_not_run():
    """Two Qwen3-Next layers are both linear attention: the family's own model has no key/value cache layer and
    does not run, which the refusal names rather than blaming compaction."""
    model = tiny_model("qwen3_next", layers=2)
    with pytest.raises(SelfCheckError, match=r"^model type 'qwen3_next': its own model with 2 layers does not run"):
        self_check(model, adapter_for(model))
