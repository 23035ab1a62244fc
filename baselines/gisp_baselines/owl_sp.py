"""OWL-sp: Wanda-sp with outlier-weighted layer-wise ratios (OWL, Yin et al. 2023, arXiv 2310.05175).

Layers whose Wanda scores hold more outliers matter more, so they lose less. One dense walk over the
calibration set measures every layer's *layer outlier distribution*

    LOD_l = fraction of the scores |W_ij| * ||X_j||_2 of layer l's weights above M x their mean,

over every linear weight of the layer. The LODs are normalised to [0, 2 lambda] over the layers, centred
on their mean and subtracted from the target: layer ``l`` loses the fraction ``ratio - (n_l - mean n)``
of its heads and of its channels, with ``n_l = 2 lambda (LOD_l - min LOD) / (max LOD - min LOD)``, so
the ratios spread over about ``[S - lambda, S + lambda]`` with the most outlier-rich layer pruned least.
Within a layer the units are ranked by Wanda-sp's scores, and the pruning walk is Wanda-sp's
(``gisp_baselines.wanda_sp.prune_layerwise``): only the allocation across layers differs.

What the references compute, and where we differ:
- LOD weights. OWL (luuyin/OWL, ``lib/prune_all.py``, ``prune_wanda_outlier``) and the GISP repository's
  OWL-sp (``pruners/owl_sp.py``, ``baseline_owl``) score every linear layer of a decoder block,
  q, k, v, o, gate, up and down, concatenate the scores of the block and count those above ``M`` times
  their mean; the walk that measures them runs the dense model. We do the same over every ``nn.Linear``
  of a layer (fused ``qkv_proj`` / ``gate_up_proj``, shared experts and their gate included). Routed
  experts (an extension: the references have none) count with their down projections, scored on the
  tokens routed to each expert; their stacked gate/up projections and the router are left out, because
  the calibration walk records per-expert inputs of the down projection only.
- Targets. The reference sets the layer ratios to average the target *structure ratio* (and the GISP
  configs raise that ratio, 0.47 for a 40% run, to land near the parameter target). Our targets are
  parameter sparsity (method.md): the common part ``ratio`` is the one whose whole-unit rounding gives the
  model-level sparsity closest to the target (``gisp_plugin.importance.uniform.ratio_for_target``), ratios
  clipped to [0, 1] (the reference floors a layer at 0.01).
- Kinds. The GISP reference applies the OWL ratio to attention heads only and cuts MLP channels at the
  uniform target ratio in every layer (its MLP branch reads ``pruning_ratio``); OWL's paper gives each
  layer one ratio. We apply the layer's ratio to every kind of unit in it.
- Protected layers. The GISP configs set ``prune_skip`` (layers outside ``range(int(0.1 L), L - 1)`` are
  neither pruned nor counted in the LOD spread); our Wanda-sp prunes every layer as FLAP's reference does,
  and OWL-sp keeps that, so ``spread=0`` is exactly Wanda-sp.
- A model whose layers all have the same LOD gets no spread (the reference divides by zero).

Options (``--option name=value``):
- ``outlier_threshold`` (float, default 5, OWL's ``M``): a score is an outlier above this many times its
  layer's mean score. OWL's README and the GISP configs use 5 (OWL's parser defaults to 3).
- ``spread`` (float, default 0.08, OWL's ``lambda``): layer ratios spread over about ``target +- spread``;
  0 gives Wanda-sp.
- ``sequential`` (bool, default true): calibrate layer i after pruning layers < i (as Wanda-sp).
- ``batch_size`` (int, default 8): calibration sequences per forward pass (results do not depend on it).
- ``onload`` (``off`` | ``cpu`` | ``disk``) and ``onload_device`` (default ``auto``): calibrate a model larger
  than the accelerator (or than memory) one layer at a time (``gisp_baselines.walk.OnloadOptions``).

Sample: ``gisp prune --method owl_sp --sparsity 0.2,0.4 --calibration c4 --n-samples 128 --seqlen 128 -o spread=0.08``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from gisp_baselines.channels import input_channel_slice
from gisp_baselines.walk import OnloadOptions, layer_walk
from gisp_baselines.wanda_sp import layer_scores, prune_layerwise
from gisp_plugin.anatomy.structures import ModelAnatomy
from gisp_plugin.calibration.sequential import LayerStatistics
from gisp_plugin.calibration.statistics import ExpertChannelStats
from gisp_plugin.importance.allocation import Scores
from gisp_plugin.importance.uniform import Offsets
from gisp_plugin.masking.sparsifier import dense_tensor
from gisp_plugin.methods.api import CalibrationDefaults, MethodSpec, PruningJob, Subnetwork
from gisp_plugin.plugins import hookimpl


@dataclass(frozen=True)
class OwlSpOptions(OnloadOptions):
    """Options of OWL-sp (see the module docstring)."""

    outlier_threshold: float = 5.0
    spread: float = 0.08
    sequential: bool = True
    batch_size: int = 8

    def __post_init__(self) -> None:  # checked when the options are parsed, before any model is loaded
        super().__post_init__()
        if not self.outlier_threshold > 0:
            raise ValueError(f"owl_sp option outlier_threshold must be > 0 (OWL's M, e.g. 5), got {self.outlier_threshold}")
        if not 0 <= self.spread <= 0.5:
            raise ValueError(f"owl_sp option spread must be in [0, 0.5] (OWL's lambda, e.g. 0.08), got {self.spread}")
        if self.batch_size < 1:
            raise ValueError(f"owl_sp option batch_size must be >= 1, got {self.batch_size}")


def linear_paths(layers: Sequence[nn.Module]) -> list[str]:
    """Paths (relative to a decoder layer) of every ``nn.Linear`` in any of the layers."""
    return sorted({path for layer in layers for path, module in layer.named_modules() if isinstance(module, nn.Linear)})


def routed_down_projections(anatomy: ModelAnatomy) -> dict[str, str]:
    """Module path (relative to a layer) of stacked routed experts -> their down projection's tensor name,
    as the anatomy declares it."""
    slices = [input_channel_slice(kind) for layer in anatomy.layers for kind in layer.kinds.values()]
    return {s.module_path: s.tensor_name for s in slices if s.stacked}


def wanda_weight_scores(layer_stats: LayerStatistics, routed: Mapping[str, str]) -> Iterator[torch.Tensor]:
    """Unstructured Wanda scores ``|W_ij| * ||X_j||`` (float64) of each recorded weight of one layer.

    A linear gives ``[out, in]``; stacked routed experts (``routed``: module path -> down projection's
    tensor name) give their down projection's ``[E, H, I]``, each expert's columns weighed by the norms
    of the tokens routed to it.
    """
    for path, stats in sorted(layer_stats.stats.items()):
        module = layer_stats.layer.get_submodule(path)
        if path in routed:
            assert isinstance(stats, ExpertChannelStats)
            weight = dense_tensor(module, routed[path]).detach().double()  # [E, H, I]
            yield weight.abs() * stats.norm.to(weight.device).unsqueeze(1)
        elif isinstance(module, nn.Linear):
            weight = dense_tensor(module, "weight").detach().double()  # [out, in]
            yield weight.abs() * stats.norm.to(weight.device)


def outlier_ratio(scores: Sequence[torch.Tensor], threshold: float) -> float:
    """LOD: the fraction of all ``scores`` above ``threshold`` times their joint mean."""
    count = sum(s.numel() for s in scores)
    mean = sum(float(s.sum()) for s in scores) / count
    return sum(int((s > threshold * mean).sum()) for s in scores) / count


def owl_offsets(outlier_ratios: Sequence[float], spread: float) -> Offsets:
    """Per-layer sparsity offsets: LODs normalised to ``[0, 2 spread]``, centred, negated (more outliers,
    less pruning). Equal LODs or ``spread=0`` give no offsets."""
    lod = torch.tensor(outlier_ratios, dtype=torch.float64)  # [layers]
    if spread == 0 or lod.max() == lod.min():
        return {i: 0.0 for i in range(len(outlier_ratios))}
    normalised = (lod - lod.min()) / (lod.max() - lod.min()) * (2 * spread)
    return {i: float(normalised.mean() - value) for i, value in enumerate(normalised)}


def dense_walk(job: PruningJob, options: OwlSpOptions) -> tuple[list[float], Scores]:
    """One walk over the dense model: every layer's LOD, and its Wanda-sp unit scores."""
    layers = job.adapter.decoder_layers(job.model)
    routed = routed_down_projections(job.anatomy)
    lods: list[float] = []
    scores: Scores = {}
    for layer_stats in layer_walk(job, "dense", options.batch_size, more_paths=linear_paths(layers)):
        lods.append(outlier_ratio(list(wanda_weight_scores(layer_stats, routed)), options.outlier_threshold))
        scores.update(layer_scores(job, layer_stats))
    return lods, scores


def run(job: PruningJob) -> Iterator[Subnetwork]:
    options: OwlSpOptions = job.options
    lods, dense_scores = dense_walk(job, options)
    offsets = owl_offsets(lods, options.spread)
    for subnetwork in prune_layerwise(job, options.sequential, options.batch_size, offsets, dense_scores):
        subnetwork.info["outlier_ratios"] = lods
        yield subnetwork


OWL_SP = MethodSpec(
    name="owl_sp",
    description="OWL-sp: Wanda-sp with layer ratios spread by each layer's share of outlier Wanda scores",
    run=run,
    options=OwlSpOptions,
    calibration=CalibrationDefaults(source="c4", n_samples=128, seqlen=128),
    nested=False,
    max_sparsity=lambda anatomy, options: anatomy.max_sparsity(),
)


@hookimpl
def gisp_methods() -> list[MethodSpec]:
    return [OWL_SP]
