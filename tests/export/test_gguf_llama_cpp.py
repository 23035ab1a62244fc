"""GGUF exports run in a real llama.cpp and compute what the transformers model computes.

Every deci family, with the shapes that trip llama.cpp's per-layer graph: uneven key/value groups, a layer
without query heads (layer 0 included: llama.cpp reads the head size there), a layer without MLP channels
(its graph skips such a layer's residual update), a removed layer, and output biases added to a layer
without heads (FLAP's compensation). float32 end to end, with llama.cpp's key/value cache in float32 too:
the logits agree to 1e-5 (they are O(1); the engines sum in different orders, and the errors measured are
~2e-7), and greedy generation through the cache gives the same tokens.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gisp_plugin.adapters.api import adapter_for
from gisp_plugin.anatomy.structures import KeepMask
from gisp_plugin.checkpoint.saving import load_pruned, save_pruned
from gisp_plugin.export.api import ExportError, ExportOptions
from gisp_plugin.export.engine_layers import grouping_cost, read_layer
from gisp_plugin.export.model_parts import model_parts
from gisp_plugin.export.run import export_folder
from tests.export import engines
from tests.tiny import SAMPLE_TEXT, random_ids, random_keep, record_for, tiny_model

DECI_FAMILIES = ["llama", "mistral", "qwen2", "phi3"]
ATOL = 1e-5


def _saved(tmp_path, tokenizer, family: str, keep_of, extra_of=None, layers: int = 4, **overrides):
    model = tiny_model(family, layers=layers, **overrides)
    adapter = adapter_for(model)
    anatomy = adapter.anatomy(model)
    keep = keep_of(anatomy)
    extra = extra_of(model) if extra_of else None
    compact = adapter.compact(model, keep, extra)
    folder = tmp_path / f"pruned-{family}"
    save_pruned(compact, tokenizer, folder, record_for(compact, anatomy, keep))
    return folder


def _uneven(anatomy):
    """Random heads and channels (uneven groups), layer 0 without heads, layer 2 without MLP channels, layer 3 removed."""
    keep = random_keep(anatomy, seed=5, p_keep=0.6, empty_layer=0)
    keep[2, "mlp_channel"] = torch.zeros_like(keep[2, "mlp_channel"])
    keep[3, "layer"] = torch.zeros(1, dtype=torch.bool)
    return keep


def _assert_runs_equal(folder, gguf, ids, steps=6):
    model = load_pruned(folder)
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
        generated = model.generate(torch.tensor([ids]), max_new_tokens=steps, do_sample=False)[0, len(ids) :].tolist()
    got = engines.logits(gguf, ids)
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
    assert engines.greedy(gguf, ids, steps) == generated


@pytest.mark.parametrize("family", DECI_FAMILIES)
def test_llama_cpp_runs_every_trap_as_transformers_does(tmp_path, tokenizer, family):
    folder = _saved(tmp_path, tokenizer, family, _uneven)
    report = export_folder(folder, "gguf", tmp_path / "model.gguf")
    model = load_pruned(folder)
    layers = [read_layer(layer, model_parts(model).declaration) for layer in model_parts(model).layers]
    assert [lay.attention.n_head for lay in layers][0] == 0 and layers[2].mlp.width == 0  # the traps are there
    assert "layer 0: one zero head" in " ".join(report.padding)
    assert "layer 2: one zero MLP channel" in " ".join(report.padding)
    # 10 tokens and 6 generated stay within Mistral's sliding window of 16, the context the GGUF declares
    _assert_runs_equal(folder, tmp_path / "model.gguf", random_ids(1, 10)[0].tolist())


def test_output_bias_of_a_layer_without_heads_survives(tmp_path, tokenizer):
    """FLAP-style biases on o_proj/down_proj, one of them in a layer that lost every head."""

    def keep_of(anatomy):
        keep = random_keep(anatomy, seed=2, p_keep=0.7)
        keep[1, "attn_head"] = torch.zeros_like(keep[1, "attn_head"])
        return keep

    def extra_of(model):
        generator = torch.Generator().manual_seed(0)
        hidden = model.config.hidden_size
        return {
            "model.layers.1.self_attn.o_proj": torch.randn(hidden, generator=generator),
            "model.layers.2.mlp.down_proj": torch.randn(hidden, generator=generator),
        }

    folder = _saved(tmp_path, tokenizer, "qwen2", keep_of, extra_of)
    report = export_folder(folder, "gguf", tmp_path / "model.gguf")
    assert "layer 1: one zero head (keeps its output bias)" in report.padding
    _assert_runs_equal(folder, tmp_path / "model.gguf", random_ids(1, 10, seed=1)[0].tolist())


@pytest.mark.parametrize("grouping", ["pad", "replicate"])
def test_both_ways_of_evening_groups_are_exact(tmp_path, tokenizer, grouping):
    folder = _saved(tmp_path, tokenizer, "mistral", lambda anatomy: random_keep(anatomy, seed=7, p_keep=0.55))
    report = export_folder(folder, "gguf", tmp_path / "model.gguf", ExportOptions(grouping=grouping))
    model = load_pruned(folder)
    read = [read_layer(layer, model_parts(model).declaration).attention for layer in model_parts(model).layers]
    uneven = [index for index, attention in enumerate(read) if not attention.is_even]
    assert uneven, "the mask was meant to leave layers with uneven groups"
    for index, (n_head, n_kv, _) in enumerate(report.details["layers"]):
        if grouping == "replicate" and index in uneven:
            assert n_kv == n_head == read[index].n_head  # one key/value copy per query head
        else:
            assert n_kv == read[index].n_kv  # the key/value cache keeps its size
    _assert_runs_equal(folder, tmp_path / "model.gguf", random_ids(1, 10, seed=2)[0].tolist())


def test_auto_grouping_executes_the_fewer_heads(tmp_path, tokenizer):
    folder = _saved(tmp_path, tokenizer, "mistral", lambda anatomy: random_keep(anatomy, seed=7, p_keep=0.55))
    model = load_pruned(folder)
    report = export_folder(folder, "gguf", tmp_path / "auto.gguf")
    checked = 0
    for index, layer in enumerate(model_parts(model).layers):
        attention = read_layer(layer, model_parts(model).declaration).attention
        if not attention.is_even:
            n_head, n_kv, _ = report.details["layers"][index]
            assert n_head + n_kv == min(grouping_cost(attention, "pad"), grouping_cost(attention, "replicate"))
            checked += 1
    assert checked, "the mask was meant to leave a layer with uneven groups"


def test_tokenizer_and_token_ids_match(tmp_path, tokenizer):
    folder = _saved(tmp_path, tokenizer, "llama", lambda anatomy: KeepMask.dense(anatomy))
    export_folder(folder, "gguf", tmp_path / "model.gguf")
    text = SAMPLE_TEXT[:200]
    assert engines.tokenize(tmp_path / "model.gguf", text) == tokenizer(text, add_special_tokens=False).input_ids


@pytest.mark.parametrize(("weight_type", "atol"), [("f16", 2e-2), ("bf16", 6e-2), ("q8_0", 6e-2)])
def test_smaller_tensor_types_run_close(tmp_path, tokenizer, weight_type, atol):
    """Rounded weights: the logits stay within the rounding of a tiny model's weights (O(1) logits)."""
    folder = _saved(
        tmp_path, tokenizer, "llama", _uneven, hidden_size=64, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2
    )
    path = tmp_path / f"model-{weight_type}.gguf"
    export_folder(folder, "gguf", path, ExportOptions(weight_type=weight_type))
    ids = random_ids(1, 10)[0].tolist()
    with torch.no_grad():
        want = load_pruned(folder)(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(engines.logits(path, ids), want, rtol=0, atol=atol)


@pytest.mark.parametrize("family", ["gemma2", "qwen3", "phi4mini"])
def test_families_the_deci_graph_cannot_run_are_refused_in_one_line(tmp_path, tokenizer, family):
    folder = _saved(tmp_path, tokenizer, family, lambda anatomy: random_keep(anatomy, seed=1, p_keep=0.7))
    with pytest.raises(ExportError) as err:
        export_folder(folder, "gguf", tmp_path / "model.gguf")
    assert "--format hf" in str(err.value) and "\n" not in str(err.value)
    assert not list(tmp_path.glob("*.gguf*")) and not list(tmp_path.glob(".model.gguf*"))
