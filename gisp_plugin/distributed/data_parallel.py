"""Data-parallel calibration: each rank calibrates on its share of the data, the ranks' results are combined.

Every rank holds the whole model and the whole calibration set (loaded identically: same source, same
seed). The calibration engines call these functions, so methods never know how many ranks there are:

- ``rank_share`` gives this rank its contiguous share of the set (``shard_range``), and of any per-sample
  weights computed on the *whole* set, so a weighted objective (``margin``'s ``1 / n_pos``) is exactly the
  full-set one once the ranks' sums are added (``GradientSums.all_reduce``).
- ``merged_over_ranks`` gathers statistics objects (anything with ``merge(other)``: ``ChannelStats``,
  ``ExpertChannelStats``, ...) from every rank and merges them in rank order, on every rank: all ranks
  then hold the same statistics, bit for bit, and take the same decisions.
- ``from_main`` runs a function on rank 0 only (reading a resume state) and hands its result to all.

With one process (no ``torchrun``) each of them is the identity.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from gisp_plugin.data.api import CalibrationSet
from gisp_plugin.distributed.context import DistributedSetup, current_setup, shard_range

T = TypeVar("T")


def rank_share(
    calibration: CalibrationSet, weights: torch.Tensor | None = None, setup: DistributedSetup | None = None
) -> tuple[CalibrationSet, torch.Tensor | None]:
    """This rank's contiguous share of ``calibration`` and of its whole-set ``weights`` ``[n]``.

    Rank ``r`` of ``W`` takes sequences ``[n*r//W, n*(r+1)//W)``: in rank order the shares are the whole
    set in its own order. Fewer sequences than ranks is refused (``shard_range``).
    """
    setup = setup or current_setup()
    if not setup.enabled:
        return calibration, weights
    part = shard_range(len(calibration), setup)
    share = CalibrationSet(
        name=calibration.name,
        sequences=calibration.sequences[part.start : part.stop],
        loss_masks=calibration.loss_masks[part.start : part.stop],
        polarity=calibration.polarity[part.start : part.stop],
        notes=calibration.notes,
    )
    return share, None if weights is None else weights[part.start : part.stop]


def _to_bytes(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _from_bytes(data: bytes, device: torch.device | str) -> Any:
    return torch.load(io.BytesIO(data), map_location=device, weights_only=False)


def merged_over_ranks(
    stats: Mapping[str, T], device: torch.device | str = "cpu", setup: DistributedSetup | None = None
) -> dict[str, T]:
    """``{name: statistics}`` merged over every rank, in rank order (rank 0's, then rank 1's merged in, ...).

    Each value needs ``merge(other)`` (in place). The objects travel serialised with ``torch.save`` and are
    loaded onto ``device`` (this rank's), so a CUDA tensor never lands on another rank's GPU. Every rank
    merges the same gathered copies in the same order, so the results are identical on all ranks. A name
    some rank never recorded is merged from the ranks that did.
    """
    setup = setup or current_setup()
    if not setup.enabled:
        return dict(stats)
    gathered: list[bytes | None] = [None] * setup.world_size
    dist.all_gather_object(gathered, _to_bytes(dict(stats)))
    merged: dict[str, T] = {}
    for data in gathered:
        for name, value in _from_bytes(data, device).items():
            if name in merged:
                merged[name].merge(value)
            else:
                merged[name] = value
    return merged


def from_main(compute: Callable[[], T], setup: DistributedSetup | None = None) -> T:
    """``compute()`` run on rank 0 alone, its result handed to every rank (rank 0 reads, all know)."""
    setup = setup or current_setup()
    if not setup.enabled:
        return compute()
    box = [compute() if setup.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
