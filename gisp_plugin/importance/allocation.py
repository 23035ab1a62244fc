"""Turning structure scores into one global ranking (the same ratio in every layer: ``uniform.py``).

Scores are a dict ``(layer, kind) -> float tensor [units]``; a unit scored ``+inf`` is never pruned, and
a NaN or ``-inf`` score stops the run (``NonFiniteError``): no method's decision rests on one.
Both allocators count parameters exactly as the anatomy does, including key/value heads that go
when the last query head reading them goes, so targets mean the paper's parameter sparsity.
"""

from __future__ import annotations

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


def prune_lowest_globally(anatomy: ModelAnatomy, scores: Scores, target: float) -> KeepMask:
    """Prune the lowest-scoring units across all layers and kinds until sparsity is closest to ``target``.

    Ties are broken by position (layer, kind, index), so the decision is deterministic.
    """
    check_scores(scores)
    keys = sorted(scores)
    flat = torch.cat([scores[key].detach().double().cpu().flatten() for key in keys])
    offsets = [0]
    for key in keys:
        offsets.append(offsets[-1] + scores[key].numel())
    order = torch.sort(flat, stable=True).indices
    freed = _removal_params(anatomy, keys, offsets, order).cumsum(0)
    prunable = int(torch.isfinite(flat[order]).sum())  # +inf (protected) units are never removed

    dense = anatomy.dense_params
    needed = target * dense
    if prunable == 0 or freed[prunable - 1] < needed - 0.5 * _largest_unit(anatomy):
        reachable = float(freed[prunable - 1]) / dense if prunable else 0.0
        raise UnreachableTargetError(f"sparsity {target} is above what the unprotected structures can give ({reachable:.3f})")
    k = int(torch.searchsorted(freed[:prunable], torch.tensor(needed, dtype=torch.float64)))
    k = min(k, prunable - 1)
    count = k + 1  # units removed: first prefix reaching the target
    if count > 1 and abs(freed[count - 2] - needed) < abs(freed[count - 1] - needed):
        count -= 1

    keep_flat = torch.ones(offsets[-1], dtype=torch.bool)
    keep_flat[order[:count]] = False
    return KeepMask({key: keep_flat[a:b] for key, a, b in zip(keys, offsets[:-1], offsets[1:], strict=True)})


def _largest_unit(anatomy: ModelAnatomy) -> int:
    return max(kind.params_per_unit for layer in anatomy.layers for kind in layer.kinds.values())
