"""REAP: router-weighted expert activation pruning (Lasby et al., Cerebras 2025, arXiv 2510.13999).

Whole routed experts of a mixture-of-experts model go; nothing else is touched. The saliency of expert
``j`` is the mean, over the calibration tokens routed to it (``j`` among the token's top-k), of the
router weight ``g_j(x)`` times the L2 norm of the expert's output ``f_j(x)``:
``S_j = 1/|X_j| * sum over x in X_j of g_j(x) * ||f_j(x)||_2``. An expert never routed to scores 0.
Every MoE layer loses the same fraction of its experts, the lowest-saliency ones, as in the paper; the
fraction is the one whose rounding gives the parameter sparsity (method.md) closest to the target.
Statistics come from one pass over the dense model, layer by layer (the core's sequential engine).

Options: ``batch_size`` (calibration sequences per forward pass; results do not depend on it).
The calibration default (c4, 128 x 512) is ours; the paper calibrates on task-specific data.
Sample: ``gisp prune --model mistralai/Mixtral-8x7B-v0.1 --method reap --sparsity 0.25,0.5``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from gisp_baselines.walk import layer_walk, stats_by_kind
from gisp_plugin.anatomy.structures import ModelAnatomy
from gisp_plugin.importance.uniform import Groups, GroupScores, keep_lowest, ratio_for_target
from gisp_plugin.methods.api import CalibrationDefaults, MethodSpec, PruningJob, Subnetwork
from gisp_plugin.plugins import hookimpl


@dataclass(frozen=True)
class ReapOptions:
    """Options of REAP (see the module docstring)."""

    batch_size: int = 8


def expert_groups(anatomy: ModelAnatomy) -> Groups:
    """Every routed expert of every layer, as the group of its channels."""
    groups: Groups = {
        (layer.index, name): kind.router_rows.readers
        for layer in anatomy.layers
        for name, kind in layer.kinds.items()
        if kind.router_rows is not None
    }
    if not groups:
        raise ValueError(f"reap prunes routed experts; this {anatomy.adapter} model has none (use a mixture-of-experts model)")
    return groups


def max_sparsity(anatomy: ModelAnatomy, options: ReapOptions) -> float:
    """Every routed expert removed (a model without routed experts is refused here, before calibration)."""
    expert_groups(anatomy)
    return anatomy.max_sparsity(blocks={"expert_mlp"})


def run(job: PruningJob) -> Iterator[Subnetwork]:
    options: ReapOptions = job.options
    if options.batch_size < 1:
        raise ValueError(f"reap option batch_size must be >= 1, got {options.batch_size}")
    groups = expert_groups(job.anatomy)
    saliency: GroupScores = {}
    for layer_stats in layer_walk(job, "dense", options.batch_size):
        stats = stats_by_kind(job, layer_stats)
        for layer, name in groups:
            if layer == layer_stats.index:
                saliency[layer, name] = stats[name].saliency
    for target in job.targets:
        ratio = ratio_for_target(job.anatomy, groups, target, saliency)
        keep = keep_lowest(job.anatomy, saliency, ratio, groups)
        job.masked.apply(keep)
        yield job.subnetwork(target, keep, info={"ratio": ratio})


REAP = MethodSpec(
    name="reap",
    description="REAP: routed experts ranked by router-weighted output norm, the same fraction removed in every MoE layer",
    run=run,
    options=ReapOptions,
    calibration=CalibrationDefaults(source="c4", n_samples=128, seqlen=512),
    nested=False,
    max_sparsity=max_sparsity,
)


@hookimpl
def gisp_methods() -> list[MethodSpec]:
    return [REAP]
