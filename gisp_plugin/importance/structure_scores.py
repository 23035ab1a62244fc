"""Summing per-element scores to structure units, and block-wise normalisation.

A per-element score is a tensor shaped like the weight (``|W * g|``, ``W ** 2``, ...). A unit's
score is the sum over every slice it owns: rows or columns, in runs of the slice's width.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from gisp_plugin.anatomy.structures import ModelAnatomy, StructureKind, TensorSlice
from gisp_plugin.masking.sparsifier import dense_tensor

Scores = dict[tuple[int, str], torch.Tensor]


def sum_slice(tensor_scores: torch.Tensor, tensor_slice: TensorSlice, count: int) -> torch.Tensor:
    """Per-unit sums (float64 ``[count]``) of an element-wise score tensor over one owned slice."""
    along = tensor_slice.along_axis(tensor_scores.double())
    return tensor_slice.per_unit(along, count).sum(1)


def kind_scores(
    layer_module: nn.Module, kind: StructureKind, element_score: Callable[[str, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Score every unit of ``kind``: ``element_score(path, dense_tensor)`` summed over owned slices."""
    total = torch.zeros(kind.count, dtype=torch.float64)
    for tensor_slice in kind.owned:
        module = layer_module.get_submodule(tensor_slice.module_path)
        tensor = dense_tensor(module, tensor_slice.tensor_name)
        total += sum_slice(element_score(tensor_slice.path, tensor), tensor_slice, kind.count).cpu()
    return total


def model_scores(model: nn.Module, anatomy: ModelAnatomy, element_score: Callable[[str, torch.Tensor], torch.Tensor]) -> Scores:
    """``kind_scores`` for every (layer, kind) of the model; paths passed on are full tensor paths."""
    scores: Scores = {}
    for layer in anatomy.layers:
        module = model.get_submodule(layer.prefix)
        for name, kind in layer.kinds.items():
            scores[layer.index, name] = kind_scores(module, kind, lambda path, t, p=layer.prefix: element_score(f"{p}.{path}", t))
    return scores


def normalize_by_block_mean(anatomy: ModelAnatomy, scores: Scores) -> Scores:
    """Divide each block type's scores by their mean over the whole model (block-wise normalisation)."""
    by_block: dict[str, list[torch.Tensor]] = {}
    for (layer, name), values in scores.items():
        by_block.setdefault(anatomy.kind(layer, name).block, []).append(values[torch.isfinite(values)])
    means = {block: torch.cat(parts).mean() for block, parts in by_block.items()}
    out = {}
    for (layer, name), values in scores.items():
        mean = means[anatomy.kind(layer, name).block]
        out[layer, name] = values / mean if mean > 0 else values
    return out
