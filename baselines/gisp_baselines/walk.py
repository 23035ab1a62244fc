"""Walking a pruning job's decoder layers with the core's sequential calibration engine."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gisp_baselines.channels import output_projections, routed_expert_paths
from gisp_plugin.calibration.sequential import LayerStatistics, Propagation, SequentialCalibration
from gisp_plugin.calibration.statistics import ChannelStats, ExpertChannelStats
from gisp_plugin.methods.api import PruningJob


def pad_token_id(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    return int(pad) if pad is not None else 0


def layer_walk(job: PruningJob, propagate: Propagation, batch_size: int, more_paths: Sequence[str] = ()) -> SequentialCalibration:
    """Sequential calibration over the job's layers, recording the inputs of every output projection
    and of ``more_paths`` (module paths relative to a decoder layer)."""
    if job.calibration is None:
        raise ValueError("this method needs calibration data; pass calibration= or a calibration source")
    paths = sorted({path for layer in job.anatomy.layers for path in output_projections(layer).values()} | set(more_paths))
    routed = sorted({path for layer in job.anatomy.layers for path in routed_expert_paths(layer)})
    return SequentialCalibration(
        job.model,
        job.adapter.decoder_layers(job.model),
        job.calibration,
        paths,
        batch_size=batch_size,
        pad_token_id=pad_token_id(job.tokenizer),
        propagate=propagate,
        routed_paths=routed,
    )


def stats_by_kind(job: PruningJob, layer_stats: LayerStatistics) -> dict[str, ChannelStats | ExpertChannelStats]:
    """Kind name -> statistics of the input of the projection that kind's units feed."""
    projections = output_projections(job.anatomy.layers[layer_stats.index])
    return {name: layer_stats.stats[path] for name, path in projections.items()}
