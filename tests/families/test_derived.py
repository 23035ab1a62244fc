"""Families no adapter declares: the anatomy read off their modules, the self-check, and the refusals.

Every method on each of these families end to end (``gisp prune``, compaction equal to masking, reload)
runs in ``test_every_method_every_family``; the compaction property test (random masks, uneven groups,
empty blocks) in ``tests/compaction``; save and reload in ``tests/checkpoint/test_saving`` — all of them
over ``tests.tiny.FAMILIES``, which holds the derived families beside the declared ones.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from gisp_plugin.adapters.adapter import decoder_adapter
from gisp_plugin.adapters.api import UnsupportedArchitectureError, adapter_for
from gisp_plugin.adapters.derived import derive_declaration
from gisp_plugin.adapters.self_check import SelfCheckError, self_check
from gisp_plugin.anatomy.decoder import AttentionNames, DecoderDeclaration, MLPNames
from gisp_plugin.anatomy.structures import KeepMask
from gisp_plugin.masking.masked_model import MaskedModel
from gisp_plugin.pruning import check_run
from tests.tiny import DERIVED_FAMILIES, FAMILIES, SIZES, TOKENS, random_ids, random_keep, tiny_model

# What each derived family's layer must be read as: (attention heads, MLP channels, fixed parameters);
# the fixed ones are the norms no unit owns (OLMo's norms have none; OLMo 2's q/k norms are cut with the heads)
PLAIN_MLP = {"starcoder2": ("c_fc", "c_proj"), "nemotron": ("up_proj", "down_proj"), "arcee": ("up_proj", "down_proj")}


@pytest.mark.parametrize("family", DERIVED_FAMILIES)
def test_derived_family_is_read_off_its_modules_and_passes_the_self_check(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    assert adapter.derived and adapter.name == model.config.model_type
    self_check(model, adapter)
    anatomy = adapter.anatomy(model)
    for layer in anatomy.layers:
        assert {name: kind.count for name, kind in layer.kinds.items()} == {"attn_head": 6, "mlp_channel": 32}
        # every parameter of the layer is either owned by a unit or fixed, and the fixed ones are 1-D
        module = model.get_submodule(layer.prefix)
        assert layer.dense_params == sum(p.numel() for p in module.parameters())
        owned = {s.path for kind in layer.kinds.values() for s in kind.owned} | {
            dep.slice.path for kind in layer.kinds.values() for dep in kind.dependents
        }
        assert all(p.dim() == 1 for name, p in module.named_parameters() if name not in owned), family
    mlp = adapter.declaration.mlp
    if family in PLAIN_MLP:
        assert mlp.gate is None and (mlp.up, mlp.down) == PLAIN_MLP[family]
        assert anatomy.layers[0].kinds["mlp_channel"].params_per_unit == 2 * SIZES["hidden_size"] + (family == "starcoder2")
    norms = adapter.declaration.attention.projection_norms
    assert (norms == ("q_norm", "k_norm")) == (family == "olmo2")


def test_a_declared_adapter_wins_over_the_derived_one():
    model = tiny_model("qwen3")
    assert derive_declaration(model) == DecoderDeclaration()  # the derivation would read it alike
    adapter = adapter_for(model)
    assert adapter.name == "qwen3" and not adapter.derived


def test_the_run_records_a_derived_anatomy_and_its_self_check(tokenizer):
    from gisp_plugin.pruning import run_method

    model = tiny_model("granite")
    (subnetwork,) = run_method(model, tokenizer, "magnitude", [0.3])
    assert subnetwork.info["anatomy"] == {"adapter": "granite", "anatomy": "derived", "self_check": "passed"}
    (declared,) = run_method(tiny_model("llama"), tokenizer, "magnitude", [0.3])
    assert declared.info["anatomy"] == {"adapter": "llama", "anatomy": "declared", "self_check": "not needed"}


def _wrong(declaration: DecoderDeclaration):
    return decoder_adapter("wrong", "a deliberately wrong declaration", ("olmo",), declaration, derived=True)


@pytest.mark.parametrize(
    ("declaration", "block"),
    [
        # the value projection read as the output one: heads cut along the wrong axis of both (same shapes)
        (DecoderDeclaration(AttentionNames(v="o_proj", o="v_proj")), "attention"),
        # the up projection read as the gate of a plain MLP: the real gate is owned by no structure
        (DecoderDeclaration(mlp=MLPNames(gate=None, up="up_proj")), "mlp"),
    ],
)
def test_the_self_check_refuses_a_wrong_declaration_in_one_line(declaration, block):
    model = tiny_model("olmo")
    adapter = _wrong(declaration)
    refusal = rf"^model type 'olmo': the \w+ read off its {block} modules were not understood"
    with pytest.raises(SelfCheckError, match=refusal) as err:
        self_check(model, adapter)
    assert "\n" not in str(err.value)


def test_check_run_refuses_a_family_that_fails_the_self_check_before_any_data(monkeypatch):
    """Persimmon lays its fused ``query_key_value`` out head by head, not as ``[q; k; v]``: the derivation
    reads it as a fused projection, the self-check sees the compacted model fail and refuses the run."""
    # adept/persimmon-8b-base: fused query_key_value, q/k LayerNorms per head, plain relu2 MLP, partial rotary
    fields = {
        "model_type": "persimmon",
        "hidden_act": "relu2",
        "layer_norm_eps": 1e-05,
        "num_attention_heads": 6,
        "partial_rotary_factor": 0.5,
        "qk_layernorm": True,
        "rope_theta": 25000.0,
        "tie_word_embeddings": False,
        **SIZES,
        **TOKENS,
        "num_hidden_layers": 2,
    }
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIG_MAPPING["persimmon"].from_dict(fields)).eval()
    assert derive_declaration(model).attention.qkv == "query_key_value"
    with pytest.raises(SelfCheckError, match=r"^model type 'persimmon': the attn_head read off its attention modules"):
        check_run(model, "magnitude", [0.3])


@pytest.mark.parametrize(
    ("model_type", "fields", "missing"),
    [
        ("deepseek_v3", {"q_lora_rank": 16, "kv_lora_rank": 8, "n_routed_experts": 4}, "multi-head latent attention"),
        # a hybrid whose layers hold a mixer and no MLP the pattern reads (Qwen3-Next and Falcon-H1 are pruned in
        # their MLPs and experts only: tests/families/test_partial.py)
        ("nemotron_h", {"num_key_value_heads": 2}, "no softmax attention module.*mixer"),
        ("gpt2", {"n_embd": 48, "n_head": 6}, "no decoder layers at model.layers"),
    ],
)
def test_families_off_the_pattern_are_refused_naming_what_is_missing(model_type, fields, missing):
    config = CONFIG_MAPPING[model_type](**{**SIZES, **TOKENS, "num_hidden_layers": 2, **fields})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedArchitectureError, match=rf"^model type '{model_type}' does not follow .*({missing})") as err:
        adapter_for(model)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("family", ["llama", "granite"])
def test_a_layer_without_heads_first_keeps_the_cache_length(family):
    """The first layer losing every query head must still advance the key/value cache: the model's next
    position is read from layer 0's cache, and a cache of zero heads reports length 0."""
    model = tiny_model(family)
    adapter = adapter_for(model)
    anatomy = adapter.anatomy(model)
    keep = KeepMask.dense(anatomy)
    keep[0, "attn_head"] = torch.zeros(6, dtype=torch.bool)
    ids = random_ids()
    with MaskedModel(model, anatomy) as masked, torch.no_grad():
        masked.apply(keep)
        reference = model(ids).logits[:, -1]
    compact = adapter.compact(model, keep)
    with torch.no_grad():
        prefix = compact(ids[:, :-1], use_cache=True)
        step = compact(ids[:, -1:], cache=prefix.cache).logits[:, -1]
    torch.testing.assert_close(step, reference, rtol=1e-5, atol=1e-5)


def test_the_tiny_derived_families_are_not_declared():
    from gisp_plugin.plugins.manager import registered

    declared = {t for entry in registered("adapter").values() for t in entry.item.model_types}
    assert not declared & {FAMILIES[family]["model_type"] for family in DERIVED_FAMILIES}
    assert len(DERIVED_FAMILIES) >= 10


@pytest.mark.parametrize("family", ["olmo2", "starcoder2", "olmoe", "qwen2_moe"])
def test_the_derivation_reads_a_model_wearing_pruning_masks_as_the_bare_one(family):
    """Methods and the runner look the adapter up while masks are on (a masked projection norm or stacked
    expert tensor is a parametrisation): the declaration must not change."""
    model = tiny_model(family)
    bare = derive_declaration(model)
    anatomy = adapter_for(model).anatomy(model)
    with MaskedModel(model, anatomy) as masked:
        masked.apply(random_keep(anatomy, 0, 0.5))
        assert derive_declaration(model) == bare
