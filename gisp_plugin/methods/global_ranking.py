"""The shared tail of one-shot global methods: one fixed ranking, cut at every target."""

from __future__ import annotations

from collections.abc import Iterator

from gisp_plugin.importance.allocation import Scores, prune_lowest_globally
from gisp_plugin.methods.api import PruningJob, Subnetwork


def cut_at_every_target(job: PruningJob, scores: Scores) -> Iterator[Subnetwork]:
    """Prune the lowest-scoring units to each target in turn; the subnetworks are nested steps."""
    for target in job.targets:
        keep = prune_lowest_globally(job.anatomy, scores, target)
        job.masked.apply(keep)
        job.trajectory.record(keep, job.anatomy.sparsity(keep), target=target)
        yield job.subnetwork(target, keep)
