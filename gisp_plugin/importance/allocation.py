"""Turning structure scores into one global ranking, or one ranking per pool of block types (the same
ratio in every layer: ``uniform.py``).

Scores are a dict ``(layer, kind) -> float tensor [units]``; a unit scored ``+inf`` is never pruned, and
a NaN or ``-inf`` score stops the run (``NonFiniteError``): no method's decision rests on one.
Both allocators count parameters exactly as the anatomy does, including key/value heads that go
when the last query head reading them goes, so targets mean the paper's parameter sparsity.
Under a shape constraint (``anatomy.shape``, ``shapes.py``) the global ranking ranks the moves the
shape admits instead of single units (``prune_lowest_constrained``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from gisp_plugin.anatomy.structures import KeepMask, ModelAnatomy
from gisp_plugin.finite import check_scores
from gisp_plugin.importance.shapes import Chain, Key, check_uniform_cover, protected_hint, tied_kinds

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
    Ties are broken by position (layer, kind, index), so the decision is deterministic. Under a shape
    constraint (``anatomy.shape``) this is ``prune_lowest_constrained``.
    """
    if anatomy.shape != "free":
        return prune_lowest_constrained(anatomy, scores, target, groups)
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


def prune_lowest_constrained(anatomy: ModelAnatomy, scores: Scores, target: float, groups: Groups | None = None) -> KeepMask:
    """One global ranking of the moves ``anatomy.shape`` admits, cut at ``target`` (see ``shapes.py``).

    Each chain of moves (a layer's kind, or under ``uniform`` one kind in every layer) gives entries
    ranked by the running maximum of their mean unit scores; the cut takes entries in rank order and
    passes over one that would overshoot the target by more than half the smallest unit (and the rest
    of its chain), so the smaller entries after it fill the gap.
    """
    check_scores(scores)
    keys = sorted(scores)
    check_uniform_cover(anatomy, keys)
    entries = []  # (rank key, position, chain, tied keys, units removed per key, parameters freed)
    for chain_index, tied in enumerate(tied_kinds(anatomy, keys)):
        moves = Chain.build(anatomy, tied, scores, groups or {}).greedy()
        running = -math.inf
        for (mean, units), freed in zip(moves, _freed_by_moves(anatomy, tied, [u for _, u in moves]), strict=True):
            running = max(running, mean)
            entries.append((running, len(entries), chain_index, tied, units, freed))
    entries.sort(key=lambda entry: entry[:2])
    needed = target * anatomy.dense_params
    tolerance = 0.5 * min(anatomy.kind(*key).params_per_unit for key in keys)
    reachable = sum(entry[5] for entry in entries if math.isfinite(entry[0]))
    if reachable < needed - tolerance:
        raise UnreachableTargetError(
            f"sparsity {target} is above what the unprotected structures can give under shape {anatomy.shape} "
            f"({reachable / anatomy.dense_params:.3f}){protected_hint(anatomy, scores)}"
        )
    flags = {key: torch.ones(anatomy.kind(*key).count, dtype=torch.bool) for key in keys}
    blocked: set[int] = set()
    removed = 0.0
    for rank, _, chain_index, tied, units, freed in entries:
        if not math.isfinite(rank):
            break
        if chain_index in blocked:
            continue
        if removed + freed > needed + tolerance:
            blocked.add(chain_index)
            continue
        removed += freed
        for key, part in zip(tied, units, strict=True):
            flags[key][part] = False
    return KeepMask(flags)


def _freed_by_moves(anatomy: ModelAnatomy, keys: list[Key], moves: list[list[list[int]]]) -> list[float]:
    """Parameters each move of a chain frees, the moves made in order: its units, and every shared slice
    (key/value head, router row) whose last reader it removes."""
    freed = [0.0] * len(moves)
    for p, key in enumerate(keys):
        kind = anatomy.kind(*key)
        readers_left = [[len(r) for r in dep.readers] for dep in kind.dependents]
        reading = {}  # unit -> [(dependent, reader group)]
        for d, dep in enumerate(kind.dependents):
            for j, readers in enumerate(dep.readers):
                for unit in readers:
                    reading.setdefault(unit, []).append((d, j))
        for index, move in enumerate(moves):
            freed[index] += len(move[p]) * kind.params_per_unit
            for unit in move[p]:
                for d, j in reading.get(unit, ()):
                    readers_left[d][j] -= 1
                    if readers_left[d][j] == 0:
                        freed[index] += kind.dependents[d].params_per_unit
    return freed


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
