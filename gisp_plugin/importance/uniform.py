"""Local (per-layer) allocation: every pruned layer loses the same fraction, units possibly grouped.

LLM-Pruner removes a whole key/value group under grouped-query attention: the key/value head and every
query head reading it. The anatomy keeps query heads as its units, so a *group* here is a tuple of
unit indices that are scored and pruned together. Every listed layer loses the same fraction of its
groups of every kind; the fraction is chosen so that the model-level parameter sparsity is closest to
the target, counting parameters exactly as the anatomy does. A non-uniform allocation (OWL) shifts each
layer's fraction by a fixed per-layer ``offset``; the common fraction is then found the same way.
Under a shape constraint (``anatomy.shape``) the number of units a kind loses is rounded to the nearest
state the shape admits on a fixed path, and the scores choose the units (``shapes.Chain.along_path``);
``uniform`` applies no per-layer offsets.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gisp_plugin.anatomy.structures import KeepMask, ModelAnatomy
from gisp_plugin.finite import check_scores
from gisp_plugin.importance.allocation import UnreachableTargetError
from gisp_plugin.importance.shapes import Chain, cells_of, check_uniform_cover

Groups = dict[tuple[int, str], tuple[tuple[int, ...], ...]]
GroupScores = dict[tuple[int, str], torch.Tensor]  # one float64 score per group
Offsets = dict[int, float]  # layer -> amount added to the common fraction (absent: 0)


def layer_ratio(ratio: float, layer: int, offsets: Offsets | None = None) -> float:
    """The fraction of groups layer ``layer`` loses: the common ``ratio`` plus its offset, within [0, 1]."""
    return min(1.0, max(0.0, ratio + (offsets or {}).get(layer, 0.0)))


def singleton_groups(anatomy: ModelAnatomy, layers: list[int]) -> Groups:
    return {(i, name): tuple((u,) for u in range(kind.count)) for i in layers for name, kind in anatomy.layers[i].kinds.items()}


def keep_groups(
    anatomy: ModelAnatomy,
    groups: Groups,
    order: dict[tuple[int, str], torch.Tensor],
    ratio: float,
    offsets: Offsets | None = None,
    scores: GroupScores | None = None,
) -> KeepMask:
    """Prune ``round(r * n_groups)`` groups of every listed (layer, kind), first in ``order``, with
    ``r = layer_ratio(ratio, layer, offsets)``.

    Under a shape constraint a kind whose cells the shape ties prunes the nearest admitted number of
    groups instead, chosen by ``scores`` (default: the positions in ``order``).
    """
    offsets = shape_offsets(anatomy, offsets)
    keep = KeepMask.dense(anatomy)
    for key, members in groups.items():
        n_prune = min(len(members), round(layer_ratio(ratio, key[0], offsets) * len(members)))
        kind = anatomy.kind(*key)
        flags = torch.ones(kind.count, dtype=torch.bool)
        if cells_of(kind, anatomy.shape) is None:
            for g in order[key][:n_prune].tolist():
                flags[list(members[g])] = False
        else:
            values = scores[key] if scores is not None else positions(order[key])
            (removed,) = Chain.build(anatomy, [key], {key: values}, {key: members}).along_path(n_prune)
            flags[removed] = False
        keep[key] = flags
    return keep


def positions(order: torch.Tensor) -> torch.Tensor:
    """Each group's position in ``order``: scores that rank the groups as ``order`` does."""
    values = torch.empty(order.numel(), dtype=torch.float64)
    values[order] = torch.arange(order.numel(), dtype=torch.float64)
    return values


def shape_offsets(anatomy: ModelAnatomy, offsets: Offsets | None) -> Offsets | None:
    """The per-layer offsets the run's shape allows: none under ``uniform`` (every layer alike)."""
    return None if anatomy.shape == "uniform" else offsets


def lowest_first(scores: GroupScores) -> dict[tuple[int, str], torch.Tensor]:
    """Group indices from lowest to highest score (ties by index); NaN or -inf scores are refused."""
    check_scores(scores)
    return {key: torch.sort(value.double().cpu(), stable=True).indices for key, value in scores.items()}


def keep_lowest(
    anatomy: ModelAnatomy, scores: GroupScores, ratio: float, groups: Groups | None = None, offsets: Offsets | None = None
) -> KeepMask:
    """Prune the ``round(r * n)`` lowest-scoring groups of every (layer, kind) in ``scores`` (``r`` as in
    ``keep_groups``).

    Without ``groups`` every unit is its own group. Keys absent from ``scores`` stay dense.
    """
    if groups is None:
        groups = {key: tuple((u,) for u in range(value.numel())) for key, value in scores.items()}
    return keep_groups(anatomy, {key: groups[key] for key in scores}, lowest_first(scores), ratio, offsets, scores)


def take_layer(keep: KeepMask, decided: KeepMask, layer: int) -> None:
    """Copy the decisions about one layer from ``decided`` into ``keep`` (sequential methods)."""
    for (index, name), flags in decided.flags.items():
        if index == layer:
            keep[index, name] = flags


def ratio_for_target(
    anatomy: ModelAnatomy, groups: Groups, target: float, scores: GroupScores | None = None, offsets: Offsets | None = None
) -> float:
    """The per-layer fraction of groups whose rounding gives the sparsity closest to ``target``.

    With ``round(ratio * n)`` groups pruned per kind, sparsity is a non-decreasing step function of the
    ratio that changes only where some ``ratio * n`` crosses a half-integer; one ratio inside each step
    is a candidate, and a bisection finds the steps either side of the target. With per-layer
    ``offsets`` layer ``l`` loses ``round((ratio + offset_l) * n)`` groups (clipped to [0, 1]): its steps
    are shifted by ``-offset_l``, and the returned ratio is the common part. With ``scores`` the
    count is exact (the groups that would really go); without them (a sequential method that scores
    layer ``i`` only after pruning layers ``< i``) the first groups stand in, which is exact when the
    groups of a kind hold equal parameters (kv groups, MLP channels) and, for single GQA query heads,
    assumes whole key/value groups go first.
    """
    layers = sorted({layer for layer, _ in groups})
    if not layers:
        raise UnreachableTargetError("no prunable layers")
    check_uniform_cover(anatomy, list(groups))
    offsets = shape_offsets(anatomy, offsets)
    full = anatomy.max_sparsity(layers)
    if target > full + 1e-9:
        raise UnreachableTargetError(f"sparsity {target} is above what layers {layers[0]}..{layers[-1]} give ({full:.3f})")
    first = lowest_first(scores) if scores is not None else {key: torch.arange(len(m)) for key, m in groups.items()}
    shifts = {(len(m), (offsets or {}).get(layer, 0.0)) for (layer, _), m in groups.items()}
    breaks = sorted({(j + 0.5) / n - offset for n, offset in shifts for j in range(n)})
    lowest, highest = min(0.0, -max(o for _, o in shifts)), max(1.0, 1.0 - min(o for _, o in shifts))
    candidates = [lowest] + [(a + b) / 2 for a, b in zip(breaks[:-1], breaks[1:], strict=True)] + [highest]

    return closest_candidate(
        candidates, lambda ratio: anatomy.sparsity(keep_groups(anatomy, groups, first, ratio, offsets, scores)), target
    )


def closest_candidate(candidates: list[float], sparsity: Callable[[float], float], target: float) -> float:
    """The candidate whose sparsity is closest to ``target`` (the lower one on a tie), for a ``sparsity``
    non-decreasing over ``candidates``: a bisection for the first reaching the target, then its neighbour."""
    low, high = 0, len(candidates) - 1  # first candidate reaching the target lies in [low, high]
    while low < high:
        mid = (low + high) // 2
        if sparsity(candidates[mid]) >= target:
            high = mid
        else:
            low = mid + 1
    if low > 0 and abs(sparsity(candidates[low - 1]) - target) <= abs(sparsity(candidates[low]) - target):
        low -= 1
    return candidates[low]
