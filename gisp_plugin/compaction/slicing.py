"""Cutting one tensor down to the units a ``KeepMask`` keeps, following the slices that cut it.

Every compaction is this one operation repeated: walk the tensor along the sliced axis, keep the
indices no structure owns, keep the runs of the kept units, and (to pad) append inert zero units.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gisp_plugin.anatomy.structures import TensorSlice


@dataclass(frozen=True)
class Cut:
    """One slice of a tensor with the flags of its units (kept or gone); kept units are padded with zero
    units up to a multiple of ``pad_to``."""

    slice: TensorSlice
    flags: torch.Tensor
    pad_to: int = 1

    @property
    def pad(self) -> int:
        kept = int(self.flags.sum())
        return -(-kept // self.pad_to) * self.pad_to - kept

    def in_expert(self, expert: int) -> Cut:
        """The cut of one expert's sub-tensor of a stacked tensor (the expert dim dropped)."""
        s = self.slice
        flags = self.flags.reshape(s.stacked, -1)[expert]
        return Cut(TensorSlice(s.path, s.axis - 1, s.width, s.offset), flags, self.pad_to)


def cut_tensor(tensor: torch.Tensor, cuts: list[Cut]) -> torch.Tensor:
    """``tensor`` with the gone units' indices removed and each cut's zero units appended after its run."""
    axes = {cut.slice.axis for cut in cuts}
    if len(axes) != 1:
        raise ValueError(f"a tensor cut along several axes {sorted(axes)} is not supported")
    axis = axes.pop()
    pieces, cursor = [], 0
    for cut in sorted(cuts, key=lambda c: c.slice.offset):
        start, stop = cut.slice.offset, cut.slice.stop(cut.flags.numel())
        if start < cursor:
            raise ValueError(f"slices of {cut.slice.path} overlap at index {start}")
        pieces.append(tensor.narrow(axis, cursor, start - cursor))
        units = cut.flags.nonzero().flatten()
        index = (units[:, None] * cut.slice.width + torch.arange(cut.slice.width)[None, :]).flatten() + start
        pieces.append(tensor.index_select(axis, index.to(tensor.device)))
        if cut.pad:
            shape = list(tensor.shape)
            shape[axis] = cut.pad * cut.slice.width
            pieces.append(tensor.new_zeros(shape))
        cursor = stop
    pieces.append(tensor.narrow(axis, cursor, tensor.shape[axis] - cursor))
    return torch.cat(pieces, dim=axis)


def cut_stacked(tensor: torch.Tensor, cuts: list[Cut], experts: list[int]) -> list[torch.Tensor]:
    """The sub-tensors of the kept ``experts`` of a stacked ``[E, ...]`` tensor, each cut by its own units."""
    return [cut_tensor(tensor[e], [cut.in_expert(e) for cut in cuts]) for e in experts]


def gathered_rows(
    cuts: list[Cut], readers_of: dict[TensorSlice, tuple[tuple[int, ...], ...]], owner_flags: torch.Tensor
) -> list[int]:
    """Rows of a cut projection's output, so that each kept owner unit gets its own copy of what it reads.

    Under uneven grouped-query attention the surviving key/value heads serve different numbers of query
    heads; one copy per query head lets the family's own attention run with one key/value head per
    query head. ``readers_of`` maps each dependent slice to its readers; other slices keep their rows.
    The cuts must tile the projection's rows end to end (as q/k/v rows do).
    """
    rows: list[int] = []
    cursor = 0  # first row of the current slice in the cut tensor
    expected = 0  # first row of the current slice in the dense tensor
    kept_owners = owner_flags.nonzero().flatten().tolist()
    for cut in sorted(cuts, key=lambda c: c.slice.offset):
        if cut.slice.offset != expected:
            raise ValueError(f"slices of {cut.slice.path} leave rows {expected}..{cut.slice.offset} to no unit")
        width, alive = cut.slice.width, cut.flags.nonzero().flatten().tolist()
        if cut.slice in readers_of:
            position = {unit: i for i, unit in enumerate(alive)}
            serving = {owner: unit for unit, owners in enumerate(readers_of[cut.slice]) for owner in owners}
            for owner in kept_owners:
                first = cursor + position[serving[owner]] * width
                rows.extend(range(first, first + width))
        else:
            rows.extend(range(cursor, cursor + len(alive) * width))
        cursor += len(alive) * width
        expected = cut.slice.stop(cut.flags.numel())
    return rows
