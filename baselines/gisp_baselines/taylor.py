"""LLM-Pruner's Taylor importance of structure groups (reference: horseee/LLM-Pruner,
``LLMPruner/pruner/hf_llama_pruner.py``, ``TaylorImportance`` with ``group_reduction="sum"``).

Per weight, the salience (option ``taylor``; ``gisp_plugin.importance.taylor``, shared with GISP), with
``g`` the mean calibration gradient and ``acc`` the mean of squared per-sample gradients:

- ``param_first`` (default): ``W * g``
- ``param_second``: ``W * acc * W``
- ``param_mix``: ``W * g - 0.5 * W * acc * W``
- ``vectorize``: ``W * g``, but summed over each row / column *before* the absolute value

A channel's importance is ``sum |salience|`` over its row (output channel) or column (input channel),
or ``|sum salience|`` for ``vectorize``; a group's importance is the sum over every channel of every
tensor in it: a head is its ``q/k/v`` rows and ``o`` columns, an MLP channel its ``gate/up`` rows and
``down`` column. Under grouped-query attention the unit is a whole key/value group: the ``k/v`` rows of
one key/value head plus the ``q`` rows and ``o`` columns of every query head reading it. Biases take no
part (the reference scores weights only).

The reference aligns the query rows of a GQA group by viewing them as ``[heads / kv_heads, kv_dim]``,
which pairs query head ``h`` with key/value head ``h mod kv_heads``; transformers' ``repeat_kv`` pairs it
with ``h // (heads / kv_heads)``. We follow the model's real layout (``DependentSlice.readers``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from gisp_plugin.anatomy.structures import ModelAnatomy, StructureKind, TensorSlice
from gisp_plugin.importance.gradients import GradientSums, weight_tensor
from gisp_plugin.importance.structure_scores import slice_along_axis
from gisp_plugin.importance.taylor import TaylorVariant, salience
from gisp_plugin.importance.uniform import Groups, GroupScores

HeadUnit = Literal["kv_group", "query_head"]


def slice_unit_scores(element: torch.Tensor, tensor_slice: TensorSlice, count: int, vectorize: bool) -> torch.Tensor:
    """Per-unit importance (float64 ``[count]``) of one slice: channels along ``axis``, ``width`` per unit.

    ``element`` may be a shard of a model sharded with FSDP2: the sums along the axis are then the whole
    tensor's (``slice_along_axis``), so ``vectorize`` takes the absolute value of whole sums, as on one process.
    """
    per_channel = slice_along_axis(element, tensor_slice).abs() if vectorize else slice_along_axis(element.abs(), tensor_slice)
    return tensor_slice.per_unit(per_channel, count).sum(1)


def _weight_slices(slices) -> list[TensorSlice]:
    return [s for s in slices if not s.is_bias]


def _slice_scores(
    model: nn.Module, prefix: str, tensor_slice: TensorSlice, count: int, sums: GradientSums, variant: TaylorVariant
) -> torch.Tensor:
    path = f"{prefix}.{tensor_slice.path}"
    if path not in sums.grad:
        raise KeyError(f"no gradient for {path}; the gradient pass must include every scored weight")
    acc = sums.grad_sq[path] if sums.grad_sq is not None else None
    element = salience(weight_tensor(model, path), sums.grad[path], acc, variant)
    return slice_unit_scores(element, tensor_slice, count, variant == "vectorize").cpu()


def kind_group_scores(
    model: nn.Module,
    prefix: str,
    kind: StructureKind,
    sums: GradientSums,
    variant: TaylorVariant,
    head_unit: HeadUnit,
) -> tuple[torch.Tensor, tuple[tuple[int, ...], ...]]:
    """Scores of the groups of one kind in one layer, and the groups (tuples of unit indices)."""
    per_unit = torch.zeros(kind.count, dtype=torch.float64)
    for tensor_slice in _weight_slices(kind.owned):
        per_unit += _slice_scores(model, prefix, tensor_slice, kind.count, sums, variant)
    if head_unit == "query_head" or not kind.dependents or kind.block != "attention":  # experts: channel by channel
        return per_unit, tuple((u,) for u in range(kind.count))
    readers = kind.dependents[0].readers
    if any(dep.readers != readers for dep in kind.dependents):
        raise ValueError(f"dependent slices of {kind.name!r} disagree on their readers; kv groups are ambiguous")
    per_group = torch.stack([per_unit[list(r)].sum() for r in readers])
    for dep in kind.dependents:
        if not dep.slice.is_bias:
            per_group += _slice_scores(model, prefix, dep.slice, len(readers), sums, variant)
    return per_group, tuple(tuple(r) for r in readers)


def group_scores(
    model: nn.Module,
    anatomy: ModelAnatomy,
    layers: list[int],
    sums: GradientSums,
    variant: TaylorVariant,
    head_unit: HeadUnit,
) -> tuple[GroupScores, Groups]:
    """Taylor importance of every group of every kind in ``layers``, and the groups themselves."""
    scores: GroupScores = {}
    groups: Groups = {}
    for i in layers:
        layer = anatomy.layers[i]
        for name, kind in layer.kinds.items():
            scores[i, name], groups[i, name] = kind_group_scores(model, layer.prefix, kind, sums, variant, head_unit)
    return scores, groups


def gradient_weight_paths(anatomy: ModelAnatomy, layers: list[int], head_unit: HeadUnit) -> list[str]:
    """Full paths of the weights a Taylor score in ``layers`` reads (shared k/v weights for kv groups)."""
    paths: list[str] = []
    for i in layers:
        layer = anatomy.layers[i]
        for kind in layer.kinds.values():
            grouped = head_unit == "kv_group" and kind.block == "attention"
            slices = list(kind.owned) + ([d.slice for d in kind.dependents] if grouped else [])
            for tensor_slice in _weight_slices(slices):
                path = f"{layer.prefix}.{tensor_slice.path}"
                if path not in paths:
                    paths.append(path)
    return paths
