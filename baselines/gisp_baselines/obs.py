"""Structured Optimal Brain Surgeon on the input columns of one linear layer (SlimGPT's pruning step).

A layer ``y = W x`` (``W [out, in]``) sees calibration inputs with Gram matrix ``G = sum_t x_t x_t^T``;
the squared output error of replacing ``W`` by ``W'`` is ``tr((W' - W) G (W' - W)^T)``. A *unit* owns
``width`` consecutive input columns (one attention head of ``o_proj``, one channel of ``down_proj``).
Removing the units ``Q`` (their columns forced to zero) and letting the other columns absorb the loss
optimally costs (OBS, with ``Hinv = G^-1``)::

    error(Q) = tr(W[:, Q] Hinv[Q, Q]^-1 W[:, Q]^T)
    W  <- W - W[:, Q] Hinv[Q, Q]^-1 Hinv[Q, :]           (the compensation; W[:, Q] becomes 0)
    Hinv <- Hinv - Hinv[:, Q] Hinv[Q, Q]^-1 Hinv[Q, :]    (the inverse Gram of the columns left)

so the final weight is the least-squares fit of the dense layer's outputs by the kept columns. The error
of every unit alone comes from one batched Cholesky factorisation of the ``[width, width]`` diagonal
blocks of ``Hinv`` (SlimGPT's grouped Cholesky: ``error(u) = ||L_u^-1 W[:, u]^T||^2`` with
``Hinv[u, u] = L_u L_u^T``). Pruning is greedy in rounds: each round removes the ``group`` lowest-error
units at once, compensates, and scores the rest again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def inverse_gram(gram: torch.Tensor, damp: float) -> torch.Tensor:
    """``(G + damp * mean(diag G) * I)^-1`` in float64; a channel never active (zero diagonal) gets 1 on it."""
    g = gram.double().clone()
    dead = torch.diagonal(g) == 0
    g[dead, dead] = 1.0
    g.diagonal().add_(damp * float(torch.diagonal(g).mean()))
    factor, info = torch.linalg.cholesky_ex(g)
    if int(info) != 0:
        raise ValueError(
            f"the calibration Gram matrix is singular at damp={damp}; raise option damp (e.g. 0.01) or add calibration data"
        )
    return torch.cholesky_inverse(factor)


def unit_columns(count: int, width: int, offset: int = 0) -> torch.Tensor:
    """Column indices of every unit, ``[count, width]``."""
    return offset + torch.arange(count * width).reshape(count, width)


def unit_errors(weight: torch.Tensor, hinv: torch.Tensor, columns: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """``tr(W_u Hinv_uu^-1 W_u^T)`` of every unit ``u`` (float64 ``[count]``; ``inf`` for units already removed)."""
    idx = columns.to(hinv.device)
    blocks = hinv[idx[:, :, None], idx[:, None, :]]  # [count, width, width]
    errors = torch.full((columns.shape[0],), torch.inf, dtype=torch.float64, device=hinv.device)
    live = alive.to(hinv.device)
    if bool(live.any()):
        factor = torch.linalg.cholesky(blocks[live])  # [live, width, width]
        w_units = weight[:, idx[live]].permute(1, 2, 0)  # [live, width, out]
        errors[live] = torch.linalg.solve_triangular(factor, w_units, upper=False).square().sum((1, 2))
    return errors


def remove_columns(weight: torch.Tensor, hinv: torch.Tensor, removed: torch.Tensor) -> None:
    """Zero the columns ``removed`` of ``weight`` and compensate the others (OBS), updating ``hinv``; in place."""
    q = removed.to(hinv.device)
    solve = torch.linalg.solve(hinv[q][:, q], hinv[q])  # Hinv_QQ^-1 Hinv_Q: [|Q|, in]
    weight -= weight[:, q] @ solve
    hinv -= hinv[:, q] @ solve
    weight[:, q] = 0.0


@dataclass
class ObsResult:
    """Units removed (in removal order), the compensated weight, and every unit's error in the first round."""

    removed: list[int]
    weight: torch.Tensor
    first_errors: torch.Tensor


def halving_groups(n_remove: int) -> list[int]:
    """Round sizes that halve what is left each time (``ceil``), ending in single units: 7 -> [4, 2, 1]."""
    sizes, left = [], n_remove
    while left > 0:
        size = -(-left // 2) if left > 1 else 1
        sizes.append(size)
        left -= size
    return sizes


@torch.no_grad()
def obs_prune(
    weight: torch.Tensor,
    gram: torch.Tensor,
    columns: torch.Tensor,
    groups: Sequence[int],
    damp: float = 0.01,
) -> ObsResult:
    """Remove ``sum(groups)`` units of ``weight`` (``[out, in]``; units' ``columns`` ``[count, width]``) in
    rounds of ``groups[i]`` lowest-error units, compensating the rest; float64 throughout."""
    w = weight.double().clone()
    hinv = inverse_gram(gram.to(w.device), damp)
    alive = torch.ones(columns.shape[0], dtype=torch.bool)
    removed: list[int] = []
    first = unit_errors(w, hinv, columns, alive).cpu()
    for round_index, size in enumerate(groups):
        if size > int(alive.sum()):
            raise ValueError(f"cannot remove {size} more of the {int(alive.sum())} units left")
        errors = first if round_index == 0 else unit_errors(w, hinv, columns, alive).cpu()
        chosen = torch.sort(errors, stable=True).indices[:size]  # ties: the lower index
        remove_columns(w, hinv, columns[chosen].flatten())
        alive[chosen] = False
        removed += chosen.tolist()
    return ObsResult(removed, w, first)
