"""Shapes an inference engine runs as they are: constraints on the subnetworks a pruning run may produce.

``--shape`` (``gisp prune``, ``gisp compare``, ``run_method(..., shape=...)``):

- ``free`` (default): any set of heads and channels.
- ``even-groups``: in every layer, each key/value group that keeps query heads keeps the same number of
  them; a group may go whole, taking its key/value head with it. llama.cpp's ``deci`` graph runs this with
  no padding (per-layer query and key/value head counts, query heads in equal contiguous groups).
- ``kv-groups``: whole key/value groups only (the query heads of a group go together).
- ``uniform``: every layer the same shape: the same key/value heads and query heads per group, the same
  MLP width; in MoE layers the same number of routed experts, every expert the same width, and the same
  shared-expert width. The family's own config then expresses it in every engine.

The constraint ties *cells* of units together: the query heads reading one key/value head (every shape
but ``free``), the channels of one routed expert (``uniform``). A layer's state in a kind is then ``m``
live cells of ``k`` units each, and only two moves keep it feasible: *narrow* (every live cell loses its
lowest unit) and *drop* (the live cell with the lowest mean score goes whole). Under ``uniform`` the
same kind of every layer moves together: a narrow or drop in all of them at once, so every step leaves
the layers alike. A kind without cells (dense MLP channels, shared experts) moves one unit at a time,
under ``uniform`` one unit in every layer at once. Removed layers (ShortGPT) are outside every
constraint: the compacted model has no such layer.

Where the constraint lives, and why (allocation time, not a projection of finished masks): every
built-in method turns its scores into a keep mask through the shared allocators, global
(``allocation.prune_lowest_globally``: GISP, FLAP AL-AM, magnitude, random) or per layer
(``uniform.keep_groups`` through ``keep_lowest`` and ``ratio_for_target``: Wanda-sp, OWL-sp, FLAP UL-UM,
LLM-Pruner, REAP, third-party methods). The run's anatomy carries the shape (``ModelAnatomy.shape``) and
those allocators read it, so every method gets the constraint without knowing it, and it meets the
method's own scores at the only point where they become a decision. A projection of finished masks
would come too late: FLAP's bias compensation, Wanda-sp's sequential calibration (layer ``i`` calibrated
on the pruned layers before it) and GISP's next gradient pass are all computed on the mask the allocator
returned, and they stay right only if that mask is already the constrained one. The pruning loop checks
every subnetwork against the shape (``violation``) and stops a method that decides outside the shared
allocators, so no mask that breaks the constraint is ever saved.

Global ranking under a constraint (GISP stays one ranking): each feasible move is an *entry* scored by
the mean score of the units it removes, so that it competes with single units on the same scale (a sum
would charge an entry for its size and push every constrained kind behind the unconstrained ones). A
layer's moves form a chain: from its current state the cheaper of narrow and drop goes next; an entry's
rank key is the largest mean so far along its chain, so a chain is never ranked out of order. All
entries of the model are sorted once (ties by position). The cut takes them in that order and passes
over an entry that would overshoot the target by more than half the smallest unit, blocking the rest of
its chain; the smaller entries after it fill the gap, so targets are met to within about one unit even
when a ``uniform`` entry removes a head from every layer at once. Units a previous cut pruned score
lowest (GISP's iterative steps, ``cut_at_every_target``), their moves come first, and since a cut never
passes its target by more than that half unit, the next (larger) target takes all of them: every cut
contains the previous one, and nested methods stay nested. The price: when only coarse entries are left
(every MLP channel gone, or ``blocks=attention``), the cut stops short of the target rather than overshoot
it, and the pruning loop warns.

Per-layer allocators (a fraction of every layer's units): the fraction gives a number of units to prune,
and the constraint rounds it to the nearest state on a fixed path of moves (the move removing fewer
units first: narrow when ``m <= k``, else drop), the same path in every layer whatever the scores. The
scores then choose the units along that path (lowest unit of each cell, lowest-mean cell). A fixed path
keeps a layer's parameter count a function of the fraction alone, which the sequential methods need to
aim at the target before they have scored the later layers, and it gives every layer the same shape
under ``uniform``. ``uniform`` leaves no room for per-layer fractions: OWL-sp's layer offsets are not
applied under it, and a method that prunes only some layers (LLM-Pruner's range, GISP's protected layers)
is refused with the option that lets it prune every layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from gisp_plugin.anatomy.structures import KeepMask, ModelAnatomy, StructureKind

SHAPES = ("free", "even-groups", "kv-groups", "uniform")
Key = tuple[int, str]
Cells = tuple[tuple[int, ...], ...]


class ShapeError(ValueError):
    """A shape name that is not one of ``SHAPES``, or a request the shape cannot serve."""


def check_shape(shape: object) -> str:
    """``shape`` if it names a shape; otherwise one line listing the valid ones."""
    if not isinstance(shape, str) or shape not in SHAPES:
        raise ShapeError(f"shape {shape!r} is not one of {', '.join(SHAPES)} (default free)")
    return shape


def cells_of(kind: StructureKind, shape: str) -> Cells | None:
    """The cells of ``kind`` whose kept counts ``shape`` ties together, or ``None`` (units move one by one).

    Key/value groups of grouped-query attention (every shape but ``free``; plain multi-head attention has
    none), the channels of each routed expert (``uniform`` only).
    """
    if shape == "free":
        return None
    if kind.block == "attention" and kind.dependents:
        readers = kind.dependents[0].readers
        return readers if any(len(r) > 1 for r in readers) else None
    if shape == "uniform" and kind.router_rows is not None:
        return kind.router_rows.readers
    return None


def tied_kinds(anatomy: ModelAnatomy, keys: Sequence[Key]) -> list[list[Key]]:
    """The keys that move together: each alone, or under ``uniform`` every layer's key of one kind (same
    name, units and cells), in layer order."""
    if anatomy.shape != "uniform":
        return [[key] for key in sorted(keys)]
    sets: dict[tuple, list[Key]] = {}
    for key in sorted(keys):
        kind = anatomy.kind(*key)
        sets.setdefault((key[1], kind.count, cells_of(kind, "uniform")), []).append(key)
    return sorted(sets.values())


def check_uniform_cover(anatomy: ModelAnatomy, keys: Sequence[Key]) -> None:
    """Under ``uniform`` a method must prune every layer holding a kind it prunes; one line otherwise."""
    if anatomy.shape != "uniform":
        return
    given = set(keys)
    for name in sorted({name for _, name in given}):
        missing = [layer.index for layer in anatomy.layers if name in layer.kinds and (layer.index, name) not in given]
        if missing:
            raise ShapeError(
                f"shape uniform gives every layer the same shape, but this method leaves {name} of layers {missing} "
                "whole; let it prune every layer (e.g. llm_pruner -o layer_start=0 -o layer_end=N) or choose another shape"
            )


def protected_hint(anatomy: ModelAnatomy, scores: dict[Key, torch.Tensor]) -> str:
    """The advice to add when a ``uniform`` target is unreachable because some units may never go."""
    if anatomy.shape == "uniform" and any(bool(torch.isinf(values).any()) for values in scores.values()):
        return "; shape uniform prunes every layer alike, so a protected layer keeps every layer whole (gisp: -o protect=none)"
    return ""


# --- which masks a shape admits ------------------------------------------------------------------------------


def layer_signature(kind: StructureKind, flags: torch.Tensor, shape: str) -> tuple[tuple[int, int] | None, str | None]:
    """``(live cells, units per live cell)`` of one kind's keep flags, or a reason the shape refuses them."""
    cells = cells_of(kind, shape)
    if cells is None:
        return (int(flags.sum()), 1), None
    counts = [int(flags[list(cell)].sum()) for cell in cells]
    alive = sorted({c for c in counts if c})
    if shape == "kv-groups" and any(0 < c < len(cell) for c, cell in zip(counts, cells, strict=True)):
        return None, f"a key/value group keeps part of its query heads ({counts} of {[len(c) for c in cells]})"
    if len(alive) > 1:
        return None, f"its groups keep unequal numbers of units ({counts})"
    return (len([c for c in counts if c]), alive[0] if alive else 0), None


def violation(anatomy: ModelAnatomy, keep: KeepMask, shape: str) -> str | None:
    """Why ``keep`` is outside ``shape`` (the first reason found), or ``None`` when the shape admits it."""
    if shape == "free":
        return None
    seen: dict[tuple[str, int], tuple[int, tuple[int, int]]] = {}
    for layer in anatomy.layers:
        if not keep.layer_kept(layer.index):
            continue
        for name, kind in layer.kinds.items():
            signature, reason = layer_signature(kind, keep[layer.index, name], shape)
            if reason is not None:
                return f"layer {layer.index} {name}: {reason}"
            if shape == "uniform":
                first = seen.setdefault((name, kind.count), (layer.index, signature))
                if first[1] != signature:
                    return (
                        f"{name}: layer {layer.index} keeps {signature[0]} x {signature[1]} units, "
                        f"layer {first[0]} keeps {first[1][0]} x {first[1][1]}"
                    )
    return None


# --- moves along a chain ---------------------------------------------------------------------------------


@dataclass
class Chain:
    """Tied (layer, kind) pairs moving together from the dense state, over *atoms*: the method's ranked
    entries (single units, or groups such as whole key/value groups or experts), each inside one cell.

    ``live[p]`` maps each live cell of part ``p`` to its live atoms, lowest score first; ``owner[p]`` gives
    each atom's cell, ``totals[p]`` each live cell's (sum of finite scores, count of infinite ones), so that
    a move costs the number of live cells, not of live atoms (routed experts hold thousands).
    """

    keys: list[Key]
    atoms: list[tuple[tuple[int, ...], ...]]
    scores: list[list[float]]
    narrowable: bool
    live: list[dict[int, list[int]]] = field(default_factory=list)
    owner: list[list[int]] = field(default_factory=list)
    totals: list[dict[int, list[float]]] = field(default_factory=list)

    @classmethod
    def build(cls, anatomy: ModelAnatomy, keys: list[Key], scores: dict[Key, torch.Tensor], groups: dict) -> Chain:
        atoms, values, live, owner, totals = [], [], [], [], []
        narrowable = anatomy.shape in ("even-groups", "uniform")
        for key in keys:
            kind = anatomy.kind(*key)
            members = groups.get(key) or tuple((u,) for u in range(kind.count))
            score = scores[key].detach().double().cpu().flatten().tolist()
            if len(score) != len(members):
                raise ValueError(f"{key}: {len(score)} scores for {len(members)} ranked entries")
            cells = cells_of(kind, anatomy.shape)
            cell_of = {u: c for c, cell in enumerate(cells) for u in cell} if cells is not None else None
            by_cell: dict[int, list[int]] = {}
            cell_index = []
            for a, units in enumerate(members):
                owners = {cell_of[u] for u in units} if cell_of is not None else {a}
                if len(owners) != 1:
                    raise ShapeError(f"{key}: a ranked group spans several key/value groups or experts; shape cannot tie it")
                cell_index.append(owners.pop())
                by_cell.setdefault(cell_index[-1], []).append(a)
            narrowable = narrowable and cells is not None and all(len(m) == 1 for m in members)
            live.append({c: sorted(m, key=lambda a: (score[a], a)) for c, m in by_cell.items()})
            totals.append(
                {
                    c: [sum(score[a] for a in m if math.isfinite(score[a])), sum(1 for a in m if math.isinf(score[a]))]
                    for c, m in by_cell.items()
                }
            )
            owner.append(cell_index)
            atoms.append(members)
            values.append(score)
        return cls(keys, atoms, values, narrowable, live, owner, totals)

    @property
    def state(self) -> tuple[int, int]:
        """``(live cells, live atoms per cell)`` (the same in every tied part)."""
        first = self.live[0]
        return len(first), (len(next(iter(first.values()))) if first else 0)

    def narrow(self) -> list[list[int]] | None:
        """Every live cell's lowest atom, in every part (``None`` where narrowing is not a move)."""
        m, k = self.state
        if not self.narrowable or k <= 1:
            return None
        return [[cell[0] for cell in part.values()] for part in self.live]

    def drop(self) -> list[list[int]] | None:
        """In every part, the atoms of its live cell with the lowest mean score (ties: lowest cell)."""
        if not self.state[0]:
            return None
        out = []
        for part, totals in zip(self.live, self.totals, strict=True):
            cell = min(part, key=lambda c: (math.inf if totals[c][1] else totals[c][0] / len(part[c]), c))
            out.append(list(part[cell]))
        return out

    def mean(self, removal: list[list[int]]) -> float:
        values = [self.scores[p][a] for p, atoms in enumerate(removal) for a in atoms]
        return sum(values) / len(values)

    def apply(self, removal: list[list[int]]) -> list[list[int]]:
        """Remove the atoms of ``removal``; returns the units removed, per part."""
        units = []
        for p, atoms in enumerate(removal):
            part, totals = self.live[p], self.totals[p]
            for a in atoms:
                cell = self.owner[p][a]
                part[cell].remove(a)
                value = self.scores[p][a]
                if math.isinf(value):
                    totals[cell][1] -= 1
                else:
                    totals[cell][0] -= value
                if not part[cell]:
                    del part[cell], totals[cell]
            units.append([u for a in atoms for u in self.atoms[p][a]])
        return units

    def greedy(self) -> list[tuple[float, list[list[int]]]]:
        """Every move from the dense state to the empty one, the cheaper (lower mean) first at each state
        (ties: narrow); each with its mean score and the units it removes, per part."""
        if not self.narrowable and all(len(atoms) == 1 for part in self.live for atoms in part.values()):
            return self._one_by_one()
        moves = []
        while self.state[0]:
            options = [r for r in (self.narrow(), self.drop()) if r is not None]
            removal = min(options, key=self.mean)
            moves.append((self.mean(removal), self.apply(removal)))
        return moves

    def _one_by_one(self) -> list[tuple[float, list[list[int]]]]:
        """``greedy`` where every cell holds one atom: move ``j`` drops the ``j``-th lowest cell of every part
        (the same moves, without searching the live cells at every step)."""
        orders = [sorted(part, key=lambda c, p=p: (self.scores[p][part[c][0]], c)) for p, part in enumerate(self.live)]
        moves = []
        for j in range(len(orders[0])):
            removal = [[self.live[p][order[j]][0]] for p, order in enumerate(orders)]
            moves.append((self.mean(removal), [list(self.atoms[p][r[0]]) for p, r in enumerate(removal)]))
        self.live = [{} for _ in self.live]
        return moves

    def along_path(self, n_prune: int) -> list[list[int]]:
        """The units removed on the fixed path (fewer atoms first: narrow when ``m <= k``) at the state
        whose pruned atoms are closest to ``n_prune`` (ties: fewer pruned), per part."""
        path: list[str] = []
        m, k = self.state
        pruned, best, best_len = 0, n_prune, 0
        while m:
            narrow = self.narrowable and k > 1 and m <= k
            pruned += m if narrow else k
            path.append("narrow" if narrow else "drop")
            m, k = (m, k - 1) if narrow else (m - 1, k)
            if abs(pruned - n_prune) < best:
                best, best_len = abs(pruned - n_prune), len(path)
        removed: list[list[int]] = [[] for _ in self.keys]
        for step in path[:best_len]:
            for p, units in enumerate(self.apply(self.narrow() if step == "narrow" else self.drop())):
                removed[p] += units
        return removed
