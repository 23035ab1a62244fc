"""Derived mixture-of-experts families whose routers hold more than a weight.

GLM-4.5 routes by sigmoid scores plus a score-correction bias (a buffer ``[E]`` on the router), ERNIE 4.5 keeps
that bias as a parameter ``[1, E]`` of a module inside its router, Hunyuan keeps the router's weight in a linear
``wg``, Phi-MoE picks its top-2 by a sparse-mixer threshold rule, MiniMax-M2 keeps the bias on the block and
passes it to its router. An expert owns its entry of every such tensor as
it owns its router row; removed, the compacted router keeps the live experts' entries only, and the masked router
routes by the family's own rule over the live experts. Tiny models from each family's own config class with the
fields its published checkpoint sets (``tests.tiny.ROUTER_FAMILIES``).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from gisp_plugin.adapters.api import adapter_for
from gisp_plugin.adapters.self_check import SelfCheckError, self_check
from gisp_plugin.checkpoint.saving import count_params, save_pruned
from gisp_plugin.pruning import run_method
from tests.compaction_check import compact_equal_to_masked
from tests.tiny import ROUTER_FAMILIES, random_ids, random_keep, record_for, tiny_model

FAMILIES = sorted(ROUTER_FAMILIES)
# (router module, where its weight is inside it, its other per-expert tensors relative to the MoE block)
ROUTERS = {
    "glm4_moe": ("gate", "weight", ("gate.e_score_correction_bias",)),
    "ernie4_5_moe": ("gate", "weight", ("gate.moe_statics.e_score_correction_bias",)),
    "hunyuan_v1_moe": ("gate", "wg.weight", ()),
    "phimoe": ("router", "weight", ()),
    "minimax_m2": ("gate", "weight", ("e_score_correction_bias",)),
}


def _model(family: str):
    """A tiny model whose score-correction biases are large enough to change which experts are picked."""
    model = tiny_model(family)
    with torch.no_grad():
        for name, tensor in [*model.named_buffers(), *model.named_parameters()]:
            if name.endswith("e_score_correction_bias"):
                tensor.copy_(torch.randn(tensor.shape, generator=torch.Generator().manual_seed(len(name))))
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_the_router_and_its_per_expert_tensors_are_read_off_the_modules(family):
    model = _model(family)
    adapter = adapter_for(model)
    experts = adapter.declaration.experts
    assert adapter.derived and (experts.router, experts.router_weight, experts.router_tensors) == ROUTERS[family]
    anatomy = adapter.anatomy(model)
    kind = anatomy.kind(1, "expert_channel")
    assert [dep.slice.path for dep in kind.router_tensors][1:] == [f"mlp.{path}" for path in experts.router_tensors]
    # a buffer is state, not a parameter: the accounting still matches the layer's real parameters
    assert anatomy.dense_params == sum(p.numel() for p in model.model.layers.parameters())
    self_check(model, adapter)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compaction_equals_masking_with_experts_removed(family, seed):
    """Random channels and whole experts removed, the experts of layer 1 all gone in one case: logits, the
    key/value cache path and greedy generation of the compacted model equal the masked model's."""
    model = _model(family)
    adapter = adapter_for(model)
    anatomy = adapter.anatomy(model)
    keep = random_keep(anatomy, seed, 0.6, 1 if seed == 2 else None, "expert_channel", p_expert_out=0.5)
    if family == "phimoe":  # its sparse mixer always picks two experts: one live expert gives NaN, masked or compacted
        keep = _two_live_experts_or_none(anatomy, keep)
    assert any(not bool(kind.router_rows.alive(keep[i, "expert_channel"]).all()) for i, kind in _routed(anatomy))
    compact = compact_equal_to_masked(model, keep, seed)
    assert count_params(compact)["decoder"] == anatomy.params_kept(keep)


def _two_live_experts_or_none(anatomy, keep):
    keep = keep.copy()
    for index, kind in _routed(anatomy):
        flags = keep[index, "expert_channel"].clone()
        alive = kind.router_rows.alive(flags)
        if int(alive.sum()) == 1:
            dead = int((~alive).nonzero()[0])
            flags[kind.router_rows.readers[dead][0]] = True
            keep[index, "expert_channel"] = flags
    return keep


def _routed(anatomy):
    return [(layer.index, layer.kinds["expert_channel"]) for layer in anatomy.layers if "expert_channel" in layer.kinds]


@pytest.mark.parametrize("family", ["glm4_moe", "ernie4_5_moe"])
def test_a_compacted_router_bias_is_saved_and_reloaded(tmp_path, tokenizer, family):
    """The cut score-correction bias (a buffer for GLM-4.5, a parameter for ERNIE 4.5) comes back from disk with
    plain transformers, and the reloaded model routes as the saved one."""
    model = _model(family)
    adapter = adapter_for(model)
    anatomy = adapter.anatomy(model)
    keep = random_keep(anatomy, 3, 0.6, p_expert_out=0.5)
    compact = adapter.compact(model, keep)
    folder = save_pruned(compact, tokenizer, tmp_path / "m", record_for(compact, anatomy, keep))
    reloaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    ids = random_ids()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, compact(ids).logits, rtol=1e-5, atol=1e-5)
    live = int(kind_alive(anatomy, keep, 1).sum())
    bias = dict(reloaded.model.layers[1].named_buffers()) | dict(reloaded.model.layers[1].named_parameters())
    (name,) = [name for name in bias if name.endswith("e_score_correction_bias")]
    assert bias[name].shape[-1] == live


def kind_alive(anatomy, keep, layer: int) -> torch.Tensor:
    return anatomy.kind(layer, "expert_channel").router_rows.alive(keep[layer, "expert_channel"])


@pytest.mark.parametrize("family", FAMILIES)
def test_layers_are_removable_only_where_renumbering_keeps_every_layer_its_kind(family):
    """GLM-4.5 (``first_k_dense_replace``) and ERNIE 4.5 (``moe_layer_start_index``) build layer ``i`` dense or with
    experts by its index: with a layer removed, the family's own model would build the next one as the wrong kind
    (compaction crashed with an AttributeError). Their layers declare no whole-layer structure, so a method that
    removes layers is refused in one line; families whose layers all hold experts keep theirs."""
    model = tiny_model(family)
    holds = [
        any(name.endswith("e_score_correction_bias") or ".experts." in name for name, _ in layer.named_parameters())
        or any(name.endswith("e_score_correction_bias") for name, _ in layer.named_buffers())
        for layer in model.model.layers
    ]
    mixed = len(set(holds)) > 1
    anatomy = adapter_for(model).anatomy(model)
    if mixed:
        with pytest.raises(LookupError, match="layers cannot be removed"):
            anatomy.whole_layer(0)
        with pytest.raises(ValueError, match="removes whole layers"):
            list(run_method(model, None, "shortgpt", [0.3], {}, calibration=None))
    else:
        assert anatomy.whole_layer(0).count == 1


def test_a_router_that_groups_its_experts_is_refused_before_any_calibration():
    """DeepSeek-V3-style group-limited routing (``n_group`` > 1) reshapes the router's scores into equal groups of
    contiguous experts; once an expert is gone it runs on no longer (``topk`` out of range), masked or compacted.
    The self-check removes whole experts, so such a model is refused in one line before calibration, not after it
    when the first expert goes. The published GLM-4.5 (one group) passes the same check."""
    grouped = tiny_model("glm4_moe", n_group=2, topk_group=1)
    with pytest.raises(SelfCheckError, match=r"^model type 'glm4_moe': the expert_channel read off its expert_mlp modules"):
        list(run_method(grouped, None, "random", [0.3], {}, calibration=None))
    published = tiny_model("glm4_moe")
    self_check(published, adapter_for(published))
