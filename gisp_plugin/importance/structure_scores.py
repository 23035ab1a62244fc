"""Summing per-element scores to structure units, and block-wise normalisation.

A per-element score is a tensor shaped like the weight (``|W * g|``, ``W ** 2``, ...). A unit's
score is the sum over every slice it owns: rows or columns, in runs of the slice's width.

Score tensors of a model sharded with FSDP2 are ``DTensor`` shards (a rank holds some rows of each
weight): each rank sums its own elements to the units (rows it holds go to their units; columns get the
partial sums over its rows), and the per-position vectors are all-reduced across ranks, so every rank
gets the same unit scores as one process would (a head's ``q_proj`` rows and ``o_proj`` columns may
sit on different ranks). Scoring code needs to know nothing of this.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from gisp_plugin.anatomy.structures import ModelAnatomy, StructureKind, TensorSlice
from gisp_plugin.masking.sparsifier import dense_tensor

Scores = dict[tuple[int, str], torch.Tensor]


def sum_slice(tensor_scores: torch.Tensor, tensor_slice: TensorSlice, count: int) -> torch.Tensor:
    """Per-unit sums (float64 ``[count]``) of an element-wise score tensor over one owned slice."""
    return tensor_slice.per_unit(slice_along_axis(tensor_scores, tensor_slice), count).sum(1)


def slice_along_axis(tensor_scores: torch.Tensor, tensor_slice: TensorSlice) -> torch.Tensor:
    """``tensor_slice.along_axis`` of a score tensor in float64, the whole tensor's even when it is sharded."""
    if isinstance(tensor_scores, DTensor):
        return _sharded_along_axis(tensor_scores, tensor_slice)
    return tensor_slice.along_axis(tensor_scores.double())


def _sharded_along_axis(tensor_scores: DTensor, tensor_slice: TensorSlice) -> torch.Tensor:
    """``tensor_slice.along_axis`` of the whole (sharded) tensor, summed across ranks: float64, on every rank."""
    local = tensor_scores.to_local().double()
    kept = (0, tensor_slice.axis) if tensor_slice.stacked else (tensor_slice.axis,)
    along = tensor_slice.along_axis(local)  # over the kept dims of this rank's rows
    (placement,) = tensor_scores.placements
    if isinstance(placement, Shard) and placement.dim in kept:  # this rank holds a run of the kept positions
        full = torch.zeros([tensor_scores.shape[d] for d in kept], dtype=torch.float64, device=local.device)
        position = kept.index(placement.dim)
        mesh = tensor_scores.device_mesh
        chunk = -(-tensor_scores.shape[placement.dim] // mesh.size())  # torch.chunk sizes, as FSDP2 shards dim 0
        full.narrow(position, min(mesh.get_local_rank() * chunk, full.shape[position]), along.shape[position]).copy_(along)
        along = full
    elif not isinstance(placement, Shard):
        return along  # replicated: every rank holds the whole tensor
    dist.all_reduce(along, group=tensor_scores.device_mesh.get_group())  # partial sums over each rank's rows
    return along


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
