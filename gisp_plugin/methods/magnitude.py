"""Built-in reference method ``magnitude``: prune the structures with the smallest weights, globally.

A unit's score is the L2 norm of all the weights it owns; scores are divided by their block type's
mean (attention and MLP norms live on different scales) and ranked in one global list. It needs no
data, and its subnetworks are nested, so one run yields every target.
"""

from __future__ import annotations

from collections.abc import Iterator

from gisp_plugin.importance.structure_scores import model_scores, normalize_by_block_mean
from gisp_plugin.methods.api import MethodSpec, PruningJob, Subnetwork
from gisp_plugin.methods.global_ranking import cut_at_every_target
from gisp_plugin.plugins import hookimpl


def run(job: PruningJob) -> Iterator[Subnetwork]:
    squared = model_scores(job.model, job.anatomy, lambda path, weight: weight.detach().float() ** 2)
    scores = normalize_by_block_mean(job.anatomy, {key: value.sqrt() for key, value in squared.items()})
    yield from cut_at_every_target(job, scores)


MAGNITUDE = MethodSpec(
    name="magnitude",
    description="Global L2 norm of each structure's weights, normalised per block type (data-free reference)",
    run=run,
    nested=True,
)


@hookimpl
def gisp_methods() -> list[MethodSpec]:
    return [MAGNITUDE]
