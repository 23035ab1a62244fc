"""Turning structure scores into one global ranking, or one ranking per pool of block types (the same
ratio in every layer: ``uniform.py``).

Scores are a dict ``(layer, kind) -> float tensor [units]``; a unit scored ``+inf`` is never pruned, and
a NaN or ``-inf`` score stops the run (``NonFiniteError``): no method's decision rests on one.
Both allocators count parameters exactly as the anatomy does, including key/value heads that go
when the last query head reading them goes, so targets mean the paper's parameter sparsity.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gisp_plugin.anatomy.structures import KeepMask, ModelAnatomy
from gisp_plugin.finite import check_scores

Scores = dict[tuple[int, str], torch.Tensor]


class UnreachableTargetError(ValueError):
    """The unprotected structures cannot give the requested sparsity."""


def _removal_params(anatomy: ModelAnatomy, keys: list[tuple[int, str]], offsets: list[int], order: torch.Tensor):
    """Parameters freed by removing each unit, when units are removed in ``order`` (flat indices)."""
    total = offsets[-1]
    position = torch.empty(total, dtype=torch.long)
    position[order] = torch.arange(total)
    freed = torch.zeros(total, dtype=torch.float64)
    for key, start, stop in zip(keys, offsets[:-1], offsets[1:], strict=True):
        kind = anatomy.kind(*key)
        freed[start:stop] += kind.params_per_unit
        for dep in kind.dependents:
            for readers in dep.readers:
                flat = torch.tensor(readers, dtype=torch.long) + start
                last = flat[position[flat].argmax()]  # the reader removed last frees the shared slice
                freed[last] += dep.params_per_unit
    return freed[order]


Groups = dict[tuple[int, str], tuple[tuple[int, ...], ...]]


def prune_lowest_globally(anatomy: ModelAnatomy, scores: Scores, target: float, groups: Groups | None = None) -> KeepMask:
    """Prune the lowest-scoring units across all layers and kinds until sparsity is closest to ``target``.

    ``groups`` (optional) ranks the units of some kinds together: for such a kind, ``scores`` holds one
    score per group (a whole expert, a key/value group) and a group's units go all at once.
    Ties are broken by position (layer, kind, index), so the decision is deterministic.
    """
    check_scores(scores)
    groups = groups or {}
    keys = sorted(scores)
    entry_of_unit: list[torch.Tensor] = []  # per key: the ranked entry (flat numbering) each unit belongs to
    unit_offsets, entries = [0], 0
    for key in keys:
        count = anatomy.kind(*key).count
        entry = torch.arange(count)
        if key in groups:
            entry = torch.empty(count, dtype=torch.long)
            for index, units in enumerate(groups[key]):
                entry[list(units)] = index
        n_entries = len(groups[key]) if key in groups else count
        if n_entries != scores[key].numel():
            raise ValueError(f"{key}: {scores[key].numel()} scores for {n_entries} ranked entries")
        entry_of_unit.append(entry + entries)
        entries += scores[key].numel()
        unit_offsets.append(unit_offsets[-1] + count)
    flat = torch.cat([scores[key].detach().double().cpu().flatten() for key in keys])
    order = torch.sort(flat, stable=True).indices  # entries, lowest first
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    owner = torch.cat(entry_of_unit)
    unit_order = torch.sort(rank[owner], stable=True).indices  # units, entry by entry in ranked order
    sizes = torch.bincount(owner, minlength=entries)[order]
    freed = _removal_params(anatomy, keys, unit_offsets, unit_order).cumsum(0)[sizes.cumsum(0) - 1]
    prunable = int(torch.isfinite(flat[order]).sum())  # +inf (protected) entries are never removed

    dense = anatomy.dense_params
    needed = target * dense
    if prunable == 0 or freed[prunable - 1] < needed - 0.5 * _largest_unit(anatomy):
        reachable = float(freed[prunable - 1]) / dense if prunable else 0.0
        raise UnreachableTargetError(f"sparsity {target} is above what the unprotected structures can give ({reachable:.3f})")
    k = int(torch.searchsorted(freed[:prunable], torch.tensor(needed, dtype=torch.float64)))
    k = min(k, prunable - 1)
    count = k + 1  # entries removed: first prefix reaching the target
    if count > 1 and abs(freed[count - 2] - needed) < abs(freed[count - 1] - needed):
        count -= 1

    keep_flat = torch.ones(unit_offsets[-1], dtype=torch.bool)
    keep_flat[unit_order[: int(sizes[:count].sum())]] = False
    return KeepMask({key: keep_flat[a:b] for key, a, b in zip(keys, unit_offsets[:-1], unit_offsets[1:], strict=True)})


def _largest_unit(anatomy: ModelAnatomy) -> int:
    return max(kind.params_per_unit for layer in anatomy.layers for kind in layer.kinds.values())


def prune_lowest_per_pool(
    anatomy: ModelAnatomy,
    scores: Scores,
    target: float,
    pool_of: Callable[[str], str | None],
    groups: Groups | None = None,
) -> KeepMask:
    """Rank each pool of block types apart; every pool loses the same fraction of its parameters.

    ``pool_of(block)`` names the pool of a block type (``None``: not ranked, kept whole). With ``P_p``
    the parameters of pool ``p`` in all decoder layers (protected ones included) and ``D`` the dense
    decoder parameters, each pool prunes its lowest-scoring units until it has freed the amount closest
    to ``f * P_p``, ``f = target * D / sum(P_p)``: the total is then ``target`` (each pool to within one
    of its units), and one pool's scores never compete with another's.
    """
    pools: dict[str, list[tuple[int, str]]] = {}
    for key in sorted(scores):
        pool = pool_of(anatomy.kind(*key).block)
        if pool is not None:
            pools.setdefault(pool, []).append(key)
    sizes = {pool: sum(anatomy.kind(*key).dense_params for key in keys) for pool, keys in pools.items()}
    fraction = target * anatomy.dense_params / sum(sizes.values())
    keep = KeepMask.dense(anatomy)
    for pool, keys in pools.items():
        own = set(keys)
        alone = {key: values if key in own else torch.full_like(values, torch.inf) for key, values in scores.items()}
        try:
            decided = prune_lowest_globally(anatomy, alone, fraction * sizes[pool] / anatomy.dense_params, groups)
        except UnreachableTargetError as err:
            raise UnreachableTargetError(f"{pool} cannot lose {fraction:.3f} of its parameters: {err}") from err
        for key in keys:
            keep[key] = decided[key]
    return keep
