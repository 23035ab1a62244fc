"""Anatomy of the Llama family (Llama 2/3, Mistral, Qwen2): attention query heads and MLP channels.

Units follow method.md: a query head owns its ``q_proj`` rows (and bias rows) and ``o_proj`` columns;
with plain multi-head attention it also owns its ``k_proj``/``v_proj`` rows. Under grouped-query
attention the key/value rows are *dependent*: they go only when every query head reading them is gone.
An MLP channel owns a row of ``gate_proj`` and ``up_proj`` and a column of ``down_proj``.
"""

from __future__ import annotations

from torch import nn

from gisp_plugin.anatomy.structures import (
    DependentSlice,
    LayerAnatomy,
    ModelAnatomy,
    StructureKind,
    TensorSlice,
)

ATTN_HEAD = "attn_head"
MLP_CHANNEL = "mlp_channel"


def _has_bias(linear: nn.Module) -> bool:
    return getattr(linear, "bias", None) is not None


def _attention_kind(attn: nn.Module) -> StructureKind:
    head_dim = attn.head_dim
    hidden = attn.q_proj.in_features
    n_heads = attn.q_proj.out_features // head_dim
    n_kv = attn.k_proj.out_features // head_dim
    qkv_bias = _has_bias(attn.q_proj)

    owned = [
        TensorSlice("self_attn.q_proj.weight", 0, head_dim),
        TensorSlice("self_attn.o_proj.weight", 1, head_dim),
    ]
    per_head = 2 * head_dim * hidden
    if qkv_bias:
        owned.append(TensorSlice("self_attn.q_proj.bias", 0, head_dim))
        per_head += head_dim

    kv_paths = ["self_attn.k_proj.weight", "self_attn.v_proj.weight"]
    if qkv_bias:
        kv_paths += ["self_attn.k_proj.bias", "self_attn.v_proj.bias"]
    dependents: list[DependentSlice] = []
    if n_kv == n_heads:
        owned += [TensorSlice(path, 0, head_dim) for path in kv_paths]
        per_head += 2 * head_dim * hidden + (2 * head_dim if qkv_bias else 0)
    else:
        group = n_heads // n_kv
        readers = tuple(tuple(range(j * group, (j + 1) * group)) for j in range(n_kv))
        for path in kv_paths:
            params = head_dim * hidden if path.endswith("weight") else head_dim
            dependents.append(DependentSlice(TensorSlice(path, 0, head_dim), readers, params))
    return StructureKind(ATTN_HEAD, "attention", n_heads, tuple(owned), per_head, tuple(dependents))


def _mlp_kind(mlp: nn.Module) -> StructureKind:
    hidden = mlp.gate_proj.in_features
    channels = mlp.gate_proj.out_features
    owned = [
        TensorSlice("mlp.gate_proj.weight", 0, 1),
        TensorSlice("mlp.up_proj.weight", 0, 1),
        TensorSlice("mlp.down_proj.weight", 1, 1),
    ]
    per_channel = 3 * hidden
    if _has_bias(mlp.gate_proj):
        owned += [TensorSlice("mlp.gate_proj.bias", 0, 1), TensorSlice("mlp.up_proj.bias", 0, 1)]
        per_channel += 2
    return StructureKind(MLP_CHANNEL, "mlp", channels, tuple(owned), per_channel)


def llama_family_anatomy(model: nn.Module, adapter_name: str) -> ModelAnatomy:
    """Read the anatomy off the model's real module shapes (so per-model head_dim etc. are honoured)."""
    layers = []
    for index, layer in enumerate(model.model.layers):
        kinds = {ATTN_HEAD: _attention_kind(layer.self_attn), MLP_CHANNEL: _mlp_kind(layer.mlp)}
        total = sum(p.numel() for p in layer.parameters())
        owned = sum(kind.dense_params for kind in kinds.values())
        layers.append(LayerAnatomy(index, f"model.layers.{index}", kinds, total - owned))
    return ModelAnatomy(adapter_name, tuple(layers), (ATTN_HEAD, MLP_CHANNEL))
