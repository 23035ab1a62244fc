"""Built-in reference method ``random``: prune uniformly random structures (seeded), globally.

The floor every real criterion must beat. One random ranking is drawn per run, so subnetworks of
one run are nested.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from gisp_plugin.methods.api import MethodSpec, PruningJob, Subnetwork
from gisp_plugin.methods.global_ranking import cut_at_every_target
from gisp_plugin.plugins import hookimpl


def run(job: PruningJob) -> Iterator[Subnetwork]:
    generator = torch.Generator().manual_seed(job.seed)
    scores = {
        (layer.index, name): torch.rand(kind.count, generator=generator, dtype=torch.float64)
        for layer in job.anatomy.layers
        for name, kind in layer.kinds.items()
    }
    yield from cut_at_every_target(job, scores)


RANDOM = MethodSpec(
    name="random",
    description="Uniformly random structures (seeded), one global ranking: the floor to beat",
    run=run,
    nested=True,
)


@hookimpl
def gisp_methods() -> list[MethodSpec]:
    return [RANDOM]
