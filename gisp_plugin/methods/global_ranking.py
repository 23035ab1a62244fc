"""The shared tail of one-shot global methods: one fixed ranking, cut at every target."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from gisp_plugin.anatomy.structures import KeepMask
from gisp_plugin.importance.allocation import Scores, prune_lowest_globally
from gisp_plugin.methods.api import PruningJob, Subnetwork


def cut_at_every_target(job: PruningJob, scores: Scores) -> Iterator[Subnetwork]:
    """Prune the lowest-scoring units to each target in turn; the subnetworks are nested steps.

    Each target is cut from the previous one: the units it pruned rank below every other, so they go
    first. Without a shape constraint that is the same cut as the fixed ranking's; under one, whose
    cut may pass over an entry that overshoots a target (``prune_lowest_constrained``), it keeps every
    cut nested in the next.
    """
    keep: KeepMask | None = None
    for target in job.targets:
        ranked = scores if keep is None else previous_first(scores, keep)
        keep = prune_lowest_globally(job.anatomy, ranked, target)
        job.masked.apply(keep)
        job.trajectory.record(keep, job.anatomy.sparsity(keep), target=target)
        yield job.subnetwork(target, keep)


def previous_first(scores: Scores, keep: KeepMask) -> Scores:
    """``scores`` with every unit ``keep`` prunes set below the lowest finite score (first out)."""
    finite = [values[torch.isfinite(values)] for values in scores.values()]
    low = min((float(v.min()) for v in finite if v.numel()), default=0.0) - 1.0
    return {key: torch.where(keep[key], values, torch.full_like(values, low)) for key, values in scores.items()}
