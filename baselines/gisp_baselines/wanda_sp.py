"""Wanda-sp: structured Wanda, as the FLAP repository runs it (``lib/prune.py``, ``prune_wanda_sp``).

Score of input channel ``j`` of ``o_proj`` / ``down_proj``: the mean over output rows of
``|W[:, j]| * ||X_j||_2``, with ``X`` that projection's input on the calibration set; a head's score
is the sum over its ``head_dim`` channels. Every layer loses the same fraction of heads and of MLP
channels (local, uniform). Sequential, as in the reference: layer ``i`` is calibrated on the outputs
of the already pruned layers before it, so each target is a separate walk over the layers.

Where we differ from the reference code, and why:
- Targets are parameter sparsity (method.md): the per-layer ratio is the one whose whole-unit rounding
  (``round(ratio * count)`` units of each kind) gives the model-level sparsity closest to the target,
  found by bisection (``gisp_plugin.importance.uniform``); the reference takes ``int(ratio * count)`` units for a
  user ratio and reports no parameter count.
- Option ``sequential=false`` calibrates every layer on the dense model's outputs instead (one walk
  serves every target): faster, not what the reference does.

Options (``--option name=value``):
- ``sequential`` (bool, default true): calibrate layer i after pruning layers < i.
- ``batch_size`` (int, default 8): calibration sequences per forward pass (results do not depend on it).
- ``onload`` (``off`` | ``cpu`` | ``disk``) and ``onload_device`` (default ``auto``): calibrate a model larger
  than the accelerator (or than memory) one layer at a time (``gisp_baselines.walk.OnloadOptions``).

Sample: ``gisp prune --method wanda_sp --sparsity 0.2,0.5 --calibration c4 --n-samples 128 --seqlen 128``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from gisp_baselines.channels import projection_weight, units_from_channels, wanda_channel_scores
from gisp_baselines.walk import OnloadOptions, layer_walk, stats_by_kind
from gisp_plugin.anatomy.structures import KeepMask
from gisp_plugin.calibration.sequential import LayerStatistics
from gisp_plugin.importance.allocation import Scores
from gisp_plugin.importance.uniform import Offsets, keep_lowest, layer_ratio, ratio_for_target, singleton_groups, take_layer
from gisp_plugin.methods.api import CalibrationDefaults, MethodSpec, PruningJob, Subnetwork
from gisp_plugin.plugins import hookimpl


@dataclass(frozen=True)
class WandaSpOptions(OnloadOptions):
    """Options of Wanda-sp (see the module docstring)."""

    sequential: bool = True
    batch_size: int = 8

    def __post_init__(self) -> None:  # checked when the options are parsed, before any model is loaded
        super().__post_init__()
        if self.batch_size < 1:
            raise ValueError(f"wanda_sp option batch_size must be >= 1, got {self.batch_size}")


def layer_scores(job: PruningJob, layer_stats: LayerStatistics) -> Scores:
    """Wanda-sp unit scores of one layer: ``(layer, kind) -> float64 [units]``."""
    layer = job.anatomy.layers[layer_stats.index]
    stats = stats_by_kind(job, layer_stats)
    scores: Scores = {}
    for name, kind in layer.kinds.items():
        channel = wanda_channel_scores(projection_weight(layer_stats.layer, kind), stats[name])
        scores[layer.index, name] = units_from_channels(channel, kind, "sum").cpu()
    return scores


def prune_layerwise(
    job: PruningJob,
    sequential: bool,
    batch_size: int,
    offsets: Offsets | None = None,
    dense_scores: Scores | None = None,
) -> Iterator[Subnetwork]:
    """Wanda-sp's pruning of every layer by its own scores, one subnetwork per target.

    Layer ``l`` loses the fraction ``ratio + offsets[l]`` of its units of every kind (``offsets`` is how
    OWL-sp allocates; none is Wanda-sp's uniform ratio), ``ratio`` chosen so the model-level parameter
    sparsity is closest to each target. ``dense_scores`` are the scores of a dense walk already made
    (``sequential=False`` needs them and makes one when absent).
    """
    all_layers = list(range(len(job.anatomy.layers)))
    groups = singleton_groups(job.anatomy, all_layers)

    def info(ratio: float) -> dict:
        described = {"ratio": ratio, "sequential": sequential}
        if offsets is not None:
            described["layer_ratios"] = [layer_ratio(ratio, i, offsets) for i in all_layers]
        return described

    if not sequential:
        scores = dense_scores
        if scores is None:
            scores = {}
            for layer_stats in layer_walk(job, "dense", batch_size):
                scores.update(layer_scores(job, layer_stats))
        for target in job.targets:
            ratio = ratio_for_target(job.anatomy, groups, target, scores, offsets)
            keep = keep_lowest(job.anatomy, scores, ratio, offsets=offsets)
            job.masked.apply(keep)
            yield job.subnetwork(target, keep, info=info(ratio))
        return

    for target in job.targets:
        ratio = ratio_for_target(job.anatomy, groups, target, offsets=offsets)
        keep = KeepMask.dense(job.anatomy)
        job.masked.apply(keep)
        for layer_stats in layer_walk(job, "pruned", batch_size):
            i = layer_stats.index
            take_layer(keep, keep_lowest(job.anatomy, layer_scores(job, layer_stats), ratio, offsets=offsets), i)
            job.masked.apply(keep)  # layer i+1 is calibrated on the pruned layer i
        yield job.subnetwork(target, keep, info=info(ratio))


def run(job: PruningJob) -> Iterator[Subnetwork]:
    options: WandaSpOptions = job.options
    yield from prune_layerwise(job, options.sequential, options.batch_size)


WANDA_SP = MethodSpec(
    name="wanda_sp",
    description="Wanda-sp: |W| * ||X|| per output-projection channel, same ratio in every layer, sequential",
    run=run,
    options=WandaSpOptions,
    calibration=CalibrationDefaults(source="c4", n_samples=128, seqlen=128),
    nested=False,
    max_sparsity=lambda anatomy, options: anatomy.max_sparsity(),
)


@hookimpl
def gisp_methods() -> list[MethodSpec]:
    return [WANDA_SP]
