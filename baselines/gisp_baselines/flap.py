"""FLAP: fluctuation-based adaptive structured pruning (reference: CASIA-IVA-Lab/FLAP, ``lib/prune.py``
``prune_flap`` and ``compress``, ``lib/layerwrapper.py`` ``BiasGPT``).

1. Walk the layers once on the dense model (the reference propagates *unpruned* outputs) and keep,
   per input channel of ``o_proj`` / ``down_proj``, the mean and the sample variance over calibration
   tokens.
2. Channel metric (option ``metric``): ``WIFV_j = var_j * ||W[:, j]||^2`` (default), ``IFV``, ``WIFN``.
   The reference squares the attention metric once more (``square_attention``, default true).
3. Structure (option ``structure``):
   - ``"AL-AM"`` (default): standardise each layer's channel metrics per block type, a head scores the
     *mean* of its channels, then one global ranking of heads and channels; the cut is where the
     kept parameters reach ``1 - target``, each unit weighted by the parameters it holds.
   - ``"UL-UM"``: every layer loses the same fraction of heads and of channels; a head scores the
     *sum* of its channels' metrics.
4. Bias compensation (``bias_compensation``, default true): each removed channel's average
   contribution moves into the projection's bias, ``b += W[:, removed] @ mean(X[removed])``. The
   biases travel in ``Subnetwork.extra_biases`` and land in the compacted model's ``o_proj`` /
   ``down_proj`` biases (so they survive save and load).

Inside routed experts (Mixtral, Qwen-MoE) the statistics of an expert's channels are taken over the
tokens routed to that expert, and its channels are standardised with the other experts' of the layer
(one block type, ``expert_mlp``). Experts get no bias compensation: an expert's output is weighted by
the router per token, and the compacted experts carry no bias.

Where we follow the reference code rather than the paper's prose: the dense propagation, the extra
square on attention, the head mean after standardisation (AL-AM) and head sum (UL-UM), and the
calibration default (WikiText-2, 1024 x 128). Where we differ, and why:
- The AL-AM cut counts parameters exactly as the anatomy does (method.md's sparsity, GQA key/value
  heads freed when their last query head goes) instead of the reference's fixed ``512 / 3`` channels
  per head, which is the same ratio for Llama-7B's plain multi-head attention.
- The fluctuation is the exact sample variance (float64, Welford-merged) by default; option
  ``fluctuation=reference`` uses the reference's streaming estimate instead, which differs in more
  than a constant (see ``channels.fluctuation_channel_scores``).
- ``propagate="pruned"`` (UL-UM only) calibrates layer i on the pruned and compensated layers before
  it, like Wanda-sp; not in the reference.

Options: ``structure``, ``metric``, ``fluctuation`` (``exact`` or ``reference``), ``square_attention``,
``bias_compensation``, ``propagate``, ``batch_size`` (default 8; results do not depend on it), and
``onload`` / ``onload_device`` for models larger than the accelerator (``gisp_baselines.walk.OnloadOptions``).
Sample: ``gisp prune --method flap --sparsity 0.2,0.5 -o structure=AL-AM --calibration wikitext2``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from gisp_baselines.channels import (
    FluctuationMetric,
    compensation_bias,
    fluctuation_channel_scores,
    input_channel_slice,
    projection_weight,
    standardize,
    units_from_channels,
)
from gisp_baselines.walk import OnloadOptions, layer_walk, stats_by_kind
from gisp_plugin.anatomy.structures import KeepMask
from gisp_plugin.calibration.sequential import LayerStatistics
from gisp_plugin.calibration.statistics import ChannelStats
from gisp_plugin.distributed.context import launch_setup
from gisp_plugin.importance.allocation import Scores, prune_lowest_globally
from gisp_plugin.importance.uniform import keep_lowest, ratio_for_target, singleton_groups, take_layer
from gisp_plugin.methods.api import CalibrationDefaults, MethodSpec, PruningJob, Subnetwork
from gisp_plugin.plugins import hookimpl


@dataclass(frozen=True)
class FlapOptions(OnloadOptions):
    """Options of FLAP (see the module docstring)."""

    structure: Literal["AL-AM", "UL-UM"] = "AL-AM"
    metric: Literal["WIFV", "IFV", "WIFN"] = "WIFV"
    fluctuation: Literal["exact", "reference"] = "exact"
    square_attention: bool = True
    bias_compensation: bool = True
    propagate: Literal["dense", "pruned"] = "dense"
    batch_size: int = 8

    def __post_init__(self) -> None:  # checked when the options are parsed, before any model is loaded
        super().__post_init__()
        if self.batch_size < 1:
            raise ValueError(f"flap option batch_size must be >= 1, got {self.batch_size}")
        if self.fluctuation == "reference" and launch_setup().enabled:
            raise ValueError(
                "flap option fluctuation='reference' follows every calibration sequence in order, which ranks that "
                "each calibrate a share of the data cannot rebuild; use fluctuation=exact under torchrun"
            )
        if self.propagate == "pruned" and self.structure != "UL-UM":
            raise ValueError(
                f"flap option propagate='pruned' needs structure='UL-UM' (got {self.structure!r}): "
                "AL-AM decides globally, after every layer's statistics"
            )


@dataclass
class LayerRecord:
    """What FLAP keeps of one layer after its statistics pass: channel metrics and input means per kind."""

    channel_metric: dict[str, torch.Tensor]  # kind -> float64 [channels]
    input_mean: dict[str, torch.Tensor]  # kind -> float64 [channels]


def layer_record(job: PruningJob, layer_stats: LayerStatistics, options: FlapOptions) -> LayerRecord:
    layer = job.anatomy.layers[layer_stats.index]
    stats: dict[str, ChannelStats] = stats_by_kind(job, layer_stats)
    metric: dict[str, torch.Tensor] = {}
    for name, kind in layer.kinds.items():
        weight = projection_weight(layer_stats.layer, kind)
        values = fluctuation_channel_scores(weight, stats[name], options.metric, options.fluctuation)
        if options.square_attention and kind.block == "attention":
            values = values.square()
        metric[name] = values.cpu()
    return LayerRecord(metric, {name: s.mean.cpu() for name, s in stats.items()})


def adaptive_scores(job: PruningJob, records: list[LayerRecord]) -> Scores:
    """AL-AM: standardised per layer and block type, heads averaged over their channels."""
    scores: Scores = {}
    for layer, record in zip(job.anatomy.layers, records, strict=True):
        for name, kind in layer.kinds.items():
            scores[layer.index, name] = units_from_channels(standardize(record.channel_metric[name]), kind, "mean")
    return scores


def uniform_scores(job: PruningJob, records: dict[int, LayerRecord]) -> Scores:
    """UL-UM: raw metrics summed over each unit's channels (only compared within a layer)."""
    scores: Scores = {}
    for index, record in records.items():
        for name, kind in job.anatomy.layers[index].kinds.items():
            scores[index, name] = units_from_channels(record.channel_metric[name], kind, "sum")
    return scores


def compensation_biases(job: PruningJob, keep: KeepMask, records: dict[int, LayerRecord]) -> dict[str, torch.Tensor]:
    """``{module path: bias}`` moving the removed channels' mean output into ``o_proj`` / ``down_proj``."""
    biases: dict[str, torch.Tensor] = {}
    for index, record in records.items():
        layer = job.anatomy.layers[index]
        module = job.model.get_submodule(layer.prefix)
        for name, kind in layer.kinds.items():
            if bool(keep[index, name].all()) or input_channel_slice(kind).stacked:  # routed experts have no bias
                continue
            weight = projection_weight(module, kind)
            bias = compensation_bias(weight, record.input_mean[name], keep[index, name], kind)
            path = f"{layer.prefix}.{input_channel_slice(kind).module_path}"
            biases[path] = bias.to(dtype=module.get_submodule(input_channel_slice(kind).module_path).weight.dtype)
    return biases


def _info(options: FlapOptions, **extra) -> dict:
    info = {"structure": options.structure, "metric": options.metric, "propagate": options.propagate, **extra}
    if options.fluctuation != "exact":
        info["fluctuation"] = options.fluctuation
    return info


def _run_dense(job: PruningJob, options: FlapOptions) -> Iterator[Subnetwork]:
    records = [layer_record(job, layer_stats, options) for layer_stats in layer_walk(job, "dense", options.batch_size)]
    by_index = dict(enumerate(records))
    all_layers = list(by_index)
    scores = adaptive_scores(job, records) if options.structure == "AL-AM" else uniform_scores(job, by_index)
    for target in job.targets:
        extra: dict = {}
        if options.structure == "AL-AM":
            keep = prune_lowest_globally(job.anatomy, scores, target)
        else:
            extra["ratio"] = ratio_for_target(job.anatomy, singleton_groups(job.anatomy, all_layers), target, scores)
            keep = keep_lowest(job.anatomy, scores, extra["ratio"])
        biases = compensation_biases(job, keep, by_index) if options.bias_compensation else {}
        job.masked.apply(keep, biases)
        yield job.subnetwork(target, keep, extra_biases=biases, info=_info(options, **extra))


def _run_pruned(job: PruningJob, options: FlapOptions) -> Iterator[Subnetwork]:
    all_layers = list(range(len(job.anatomy.layers)))
    for target in job.targets:
        ratio = ratio_for_target(job.anatomy, singleton_groups(job.anatomy, all_layers), target)
        keep = KeepMask.dense(job.anatomy)
        biases: dict[str, torch.Tensor] = {}
        job.masked.apply(keep)
        for layer_stats in layer_walk(job, "pruned", options.batch_size):
            i = layer_stats.index
            record = {i: layer_record(job, layer_stats, options)}
            take_layer(keep, keep_lowest(job.anatomy, uniform_scores(job, record), ratio), i)
            if options.bias_compensation:
                biases.update(compensation_biases(job, keep, record))
            job.masked.apply(keep, biases)
        biases = {path: bias.to(job.device) for path, bias in biases.items()}  # computed where an onloaded layer ran
        yield job.subnetwork(target, keep, extra_biases=biases, info=_info(options, ratio=ratio))


def run(job: PruningJob) -> Iterator[Subnetwork]:
    options: FlapOptions = job.options
    if options.propagate == "pruned":
        yield from _run_pruned(job, options)
    else:
        yield from _run_dense(job, options)


FLAP = MethodSpec(
    name="flap",
    description="FLAP: fluctuation (variance x weight norm) of output-projection inputs, adaptive global "
    "structure, bias compensation",
    run=run,
    options=FlapOptions,
    calibration=CalibrationDefaults(source="wikitext2", n_samples=1024, seqlen=128),
    nested=False,
    max_sparsity=lambda anatomy, options: anatomy.max_sparsity(),
)


@hookimpl
def gisp_methods() -> list[MethodSpec]:
    return [FLAP]


__all__ = ["FLAP", "FlapOptions", "FluctuationMetric"]
