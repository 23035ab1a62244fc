"""Walking a pruning job's decoder layers with the core's sequential calibration engine, optionally
with the layers onloaded one at a time from CPU memory or disk (``OnloadOptions``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gisp_baselines.channels import output_projections, routed_expert_paths
from gisp_plugin.calibration.onloading import LayerPlacement, Onload, execution_device
from gisp_plugin.calibration.sequential import LayerStatistics, Propagation, SequentialCalibration
from gisp_plugin.calibration.statistics import ChannelStats, ExpertChannelStats
from gisp_plugin.methods.api import PruningJob


def pad_token_id(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    return int(pad) if pad is not None else 0


@dataclass(frozen=True)
class OnloadOptions:
    """Options of the layer-wise methods for models larger than the accelerator (or than memory).

    - ``onload`` (``off`` | ``cpu`` | ``disk``, default off): ``cpu`` keeps every decoder layer in CPU memory
      and moves one at a time to ``onload_device`` while calibrating (load the model with ``--device cpu``);
      ``disk`` keeps a waiting layer's weights only in the model folder's safetensors files and reads
      them for its turn. Results are those of the in-memory run; afterwards the model is where it was.
    - ``onload_device`` (default ``auto``: the first GPU if there is one, else the CPU): where layers run.

    Sample: ``gisp prune --model meta-llama/Llama-2-70b-hf --device cpu --method wanda_sp -o onload=cpu``.
    """

    onload: Onload = "off"
    onload_device: str = "auto"

    def __post_init__(self) -> None:  # checked when the options are parsed, before any model is loaded
        try:
            execution_device(self.onload_device)
        except RuntimeError as err:
            raise ValueError(f"option onload_device={self.onload_device!r} is not a device (auto, cpu, cuda, cuda:1)") from err


def layer_walk(
    job: PruningJob, propagate: Propagation, batch_size: int, more_paths: Sequence[str] = (), gram_paths: Sequence[str] = ()
) -> SequentialCalibration:
    """Sequential calibration over the job's layers, recording the inputs of every output projection
    and of ``more_paths`` (module paths relative to a decoder layer), and the input Gram matrices of
    ``gram_paths``. Options derived from ``OnloadOptions`` choose where the layers wait."""
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
        placement=placement_for(job),
        gram_paths=gram_paths,
    )


def placement_for(job: PruningJob) -> LayerPlacement | None:
    """The layer placement the job's options ask for (None: the model stays where it is)."""
    options = job.options
    if not isinstance(options, OnloadOptions) or options.onload == "off":
        return None
    return LayerPlacement(job.model, job.adapter.decoder_layers(job.model), options.onload, options.onload_device)


def stats_by_kind(job: PruningJob, layer_stats: LayerStatistics) -> dict[str, ChannelStats | ExpertChannelStats]:
    """Kind name -> statistics of the input of the projection that kind's units feed."""
    projections = output_projections(job.anatomy.layers[layer_stats.index])
    return {name: layer_stats.stats[path] for name, path in projections.items()}
