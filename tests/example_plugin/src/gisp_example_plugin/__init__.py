"""An example gisp-plugin method, ``lowest-index``: the smallest complete plugin there is.

In every layer it prunes the units with the lowest indices, the same fraction of heads and of MLP
channels everywhere, chosen so that the parameter sparsity is closest to each target. It needs no
data, its subnetworks are nested, and it is found by the entry point in this package's
``pyproject.toml`` (group ``gisp_plugin``); nothing in gisp-plugin knows about it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from gisp_plugin.importance.uniform import keep_lowest, ratio_for_target, singleton_groups
from gisp_plugin.methods.api import MethodSpec, PruningJob, Subnetwork
from gisp_plugin.plugins import hookimpl


@dataclass(frozen=True)
class LowestIndexOptions:
    """``skip_first``: leave this many first layers whole."""

    skip_first: int = 0


def run(job: PruningJob) -> Iterator[Subnetwork]:
    layers = list(range(job.options.skip_first, len(job.anatomy.layers)))
    scores = {
        (layer, name): torch.arange(kind.count, dtype=torch.float64)
        for layer in layers
        for name, kind in job.anatomy.layers[layer].kinds.items()
    }
    for target in job.targets:
        ratio = ratio_for_target(job.anatomy, singleton_groups(job.anatomy, layers), target, scores)
        keep = keep_lowest(job.anatomy, scores, ratio)
        job.masked.apply(keep)
        job.trajectory.record(keep, job.anatomy.sparsity(keep), target=target)
        yield job.subnetwork(target, keep, info={"ratio": ratio})


LOWEST_INDEX = MethodSpec(
    name="lowest-index",
    description="Example plugin: prune the lowest-index heads and channels of every layer (uniform ratio)",
    run=run,
    options=LowestIndexOptions,
    nested=True,
    max_sparsity=lambda anatomy, options: anatomy.max_sparsity(list(range(options.skip_first, len(anatomy.layers)))),
)


@hookimpl
def gisp_methods() -> list[MethodSpec]:
    return [LOWEST_INDEX]
