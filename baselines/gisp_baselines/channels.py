"""Activation-based scores of the input channels of output projections, and of the units owning them.

Wanda-sp and FLAP look at the weight whose *input columns* a unit owns: ``o_proj`` for an attention
head (``head_dim`` columns), ``down_proj`` for an MLP channel (one column). Everything here is a
plain function of that weight ``W`` (``[out, in]``) and the statistics of its input ``X`` over the
calibration tokens; the results are float64 ``[in]`` (channels) or ``[count]`` (units).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from gisp_plugin.anatomy.structures import LayerAnatomy, StructureKind, TensorSlice
from gisp_plugin.calibration.statistics import ChannelStats
from gisp_plugin.masking.sparsifier import dense_tensor

FluctuationMetric = Literal["WIFV", "IFV", "WIFN"]
Fluctuation = Literal["exact", "reference"]


def input_channel_slice(kind: StructureKind) -> TensorSlice:
    """The owned weight slice that cuts a projection's input columns (``o_proj``, ``down_proj``, or the
    stacked ``down_proj [E, H, I]`` of routed experts)."""
    for tensor_slice in kind.owned:
        if not tensor_slice.is_bias and tensor_slice.axis == (2 if tensor_slice.stacked else 1):
            return tensor_slice
    raise ValueError(f"structure kind {kind.name!r} owns no input columns of a weight; activation scores need one")


def output_projections(layer: LayerAnatomy) -> dict[str, str]:
    """Kind name -> module path (relative to the decoder layer) of the projection it feeds (for routed
    experts: the stacked experts module)."""
    return {name: input_channel_slice(kind).module_path for name, kind in layer.kinds.items()}


def routed_expert_paths(layer: LayerAnatomy) -> list[str]:
    """Module paths (relative to the layer) of stacked routed experts, whose statistics are per expert."""
    return [input_channel_slice(kind).module_path for kind in layer.kinds.values() if input_channel_slice(kind).stacked]


def projection_weight(layer_module: nn.Module, kind: StructureKind) -> torch.Tensor:
    """The dense (unmasked) weight whose input columns ``kind``'s units own, in float64 (``[E, out, in]``
    for routed experts)."""
    tensor_slice = input_channel_slice(kind)
    weight = dense_tensor(layer_module.get_submodule(tensor_slice.module_path), tensor_slice.tensor_name)
    return weight.detach().double()


def wanda_channel_scores(weight: torch.Tensor, stats: ChannelStats) -> torch.Tensor:
    """Wanda-sp: ``mean over rows of |W[:, j]| * ||X_j||_2`` for every input channel ``j``.

    The reference divides ``||X_j||^2`` by the number of calibration sequences before the square root;
    a constant per layer that changes no decision of a per-layer ranking, so it is left out. A stacked
    expert weight ``[E, out, in]`` with per-expert statistics gives ``[E, in]``.
    """
    return weight.abs().mean(-2) * stats.norm.to(weight.device)


def fluctuation_channel_scores(
    weight: torch.Tensor, stats: ChannelStats, metric: FluctuationMetric, fluctuation: Fluctuation = "exact"
) -> torch.Tensor:
    """FLAP's channel metrics: ``WIFV = var_j * ||W[:, j]||^2`` (default), ``IFV = var_j``, ``WIFN``.

    ``var_j`` is the fluctuation of channel ``j`` over calibration tokens: with ``fluctuation="exact"``
    the sample variance; with ``"reference"`` the reference code's streaming estimate
    (``ChannelStats.reference_fluctuation``). The two are *not* a constant per layer apart: the
    estimate leaves out the first sequence, weighs sequence ``k`` by ``(k-1)/k`` and measures each one
    against the running mean, so it ranks channels differently when calibration sequences are few
    (about 7% of decisions at 8 sequences, 0.4% at 1,024) and converges to the variance with many.
    ``WIFN`` is Wanda's weighted norm: ``mean over rows of |W[:, j]| * ||X_j||`` (no fluctuation).
    """
    if fluctuation not in ("exact", "reference"):
        raise ValueError(f"unknown FLAP fluctuation {fluctuation!r}; choose exact or reference")
    if metric == "WIFN":
        return wanda_channel_scores(weight, stats)
    variance = stats.variance if fluctuation == "exact" else stats.reference_fluctuation
    if metric == "WIFV":
        return variance.to(weight.device) * weight.square().sum(-2)
    if metric == "IFV":
        return variance.to(weight.device).clone()
    raise ValueError(f"unknown FLAP metric {metric!r}; choose WIFV, IFV or WIFN")


def units_from_channels(channel_scores: torch.Tensor, kind: StructureKind, reduce: Literal["sum", "mean"]) -> torch.Tensor:
    """Sum or average the channel scores of each unit's ``width`` consecutive columns (float64 ``[count]``)."""
    per_unit = input_channel_slice(kind).per_unit(channel_scores.double(), kind.count)
    if reduce == "sum":
        return per_unit.sum(1)
    if reduce == "mean":
        return per_unit.mean(1)
    raise ValueError(f"unknown reduction {reduce!r}; choose sum or mean")


def standardize(values: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / std`` over all entries (sample std), as FLAP's AL-AM does per layer and block."""
    if values.numel() < 2:
        return torch.zeros_like(values)
    std = values.std()
    return (values - values.mean()) / std if std > 0 else torch.zeros_like(values)


def compensation_bias(weight: torch.Tensor, mean: torch.Tensor, keep_units: torch.Tensor, kind: StructureKind) -> torch.Tensor:
    """FLAP's bias compensation ``W[:, removed] @ mean(X[removed])``: the removed channels' average output.

    ``keep_units`` are the kind's keep flags; a removed unit removes its ``width`` input columns.
    Returns float64 ``[out]`` (all zeros when nothing is removed).
    """
    removed = ~input_channel_slice(kind).keep_mask(keep_units.to(weight.device), weight.shape).flatten()
    return weight[:, removed] @ mean.to(weight.device, torch.float64)[removed]
