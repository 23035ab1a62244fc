"""SlimGPT: layer-wise structured Optimal-Brain-Surgeon pruning of heads and MLP channels (Ling et al. 2024,
NeurIPS, arXiv 2412.18110; no reference code was released).

1. Sequential, like Wanda-sp and FLAP's pruned walk: layer ``i`` is calibrated on the outputs of layers
   ``< i`` as already pruned *and compensated*, and one pass over it gives the Gram matrix ``G = sum x x^T``
   of the input of ``o_proj`` (heads) and ``down_proj`` (MLP channels) on the calibration tokens.
2. Batched greedy pruning (``gisp_baselines.obs``): the error of removing each unit with optimal
   compensation of the columns left, ``tr(W_u Hinv_uu^-1 W_u^T)``, comes for every unit at once from one
   batched Cholesky factorisation of the diagonal blocks of ``Hinv`` (the grouped Cholesky decomposition
   that makes a head's error exact, not a sum of its columns' errors); the lowest-error units go, the others
   are compensated (``W -= W_Q Hinv_QQ^-1 Hinv_Q``), ``Hinv`` is updated and the errors are computed again.
   Heads go one per round. MLP channels go in rounds of dynamic group size, half of what is left each
   round (``ceil``), down to single channels at the end, where the choices matter most.
3. Incremental pruning ratio: deeper layers lose more, since errors of early layers accumulate through
   every later one. Option ``schedule="log"`` (default) gives layer ``l`` of ``L`` the fraction
   ``s * ln(1 + l) / ln(L)`` of its heads and of its channels (the first layer is kept whole), ``s`` chosen
   so that the model's parameter sparsity is closest to the target; ``"uniform"`` gives every layer ``s``.

The compensation changes kept weights: the new ``o_proj`` / ``down_proj`` weights travel in
``Subnetwork.updated_weights``, the masked model computes with them while later layers are calibrated,
and compaction cuts them into the saved model.

Options: ``schedule`` (``log`` | ``uniform``), ``damp`` (default 0.01: ``damp * mean(diag G)`` is added to
the diagonal before inverting, as SparseGPT does; 0 is the plain least-squares fit and needs more
calibration tokens than channels), ``batch_size`` (default 8; results do not depend on it).

What we cannot check against code, and where we choose: the paper gives the logarithmic shape of the
ratio schedule and the shrinking FFN group size, not their constants; we start the schedule at 0 in the
first layer and halve the group each round. Both projections of a layer take their Gram matrices from
the same pass (the MLP's from the layer's dense attention output, as in SparseGPT's default). Calibration:
C4, 128 sequences of 2048 tokens, the OBS methods' usual setting. Routed experts (Mixtral, Qwen-MoE) are
not pruned by the paper's method and are refused here (the method names itself in the error).

Sample: ``gisp prune --model HuggingFaceTB/SmolLM2-135M --method slimgpt --sparsity 0.2,0.5``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from gisp_baselines.channels import input_channel_slice, projection_weight
from gisp_baselines.obs import halving_groups, obs_prune, unit_columns
from gisp_baselines.walk import layer_walk
from gisp_plugin.anatomy.structures import KeepMask, ModelAnatomy
from gisp_plugin.calibration.sequential import LayerStatistics
from gisp_plugin.importance.uniform import Offsets, closest_candidate, keep_groups, singleton_groups
from gisp_plugin.methods.api import CalibrationDefaults, MethodSpec, PruningJob, Subnetwork
from gisp_plugin.plugins import hookimpl

SCHEDULES = ("log", "uniform")


@dataclass(frozen=True)
class SlimGptOptions:
    """Options of SlimGPT (see the module docstring)."""

    schedule: Literal["log", "uniform"] = "log"
    damp: float = 0.01
    batch_size: int = 8

    def __post_init__(self) -> None:  # checked when the options are parsed, before any model is loaded
        if self.schedule not in SCHEDULES:
            raise ValueError(f"slimgpt option schedule must be one of {', '.join(SCHEDULES)}; got {self.schedule!r}")
        if not self.damp >= 0:
            raise ValueError(f"slimgpt option damp must be >= 0, got {self.damp}")
        if self.batch_size < 1:
            raise ValueError(f"slimgpt option batch_size must be >= 1, got {self.batch_size}")


def depth_weights(layers: int, schedule: str) -> list[float]:
    """How much of the common fraction ``s`` each layer loses: ``ln(1 + l) / ln(L)`` (log) or 1 (uniform)."""
    if schedule == "uniform" or layers == 1:
        return [1.0] * layers
    return [math.log(1 + index) / math.log(layers) for index in range(layers)]


def layer_ratios(scale: float, weights: list[float]) -> Offsets:
    """Layer -> fraction of its units pruned (``scale * weight``, at most 1)."""
    return {index: min(1.0, scale * weight) for index, weight in enumerate(weights)}


def scale_for_target(anatomy: ModelAnatomy, weights: list[float], target: float) -> float:
    """The common fraction ``s`` whose rounded per-layer counts give the sparsity closest to ``target``.

    Layer ``l`` loses ``round(s * w_l * n)`` units of a kind of ``n``: the sparsity is a step function of
    ``s`` that changes where ``s * w_l * n`` crosses a half-integer; one ``s`` inside each step is a
    candidate and a bisection finds the steps either side of the target. Counted with the first units
    standing in, which is exact for MLP channels and for whole key/value groups of heads.
    """
    groups = singleton_groups(anatomy, list(range(len(anatomy.layers))))
    first = {key: torch.arange(len(members)) for key, members in groups.items()}
    counts = {(len(members), weights[layer]) for (layer, _), members in groups.items() if weights[layer] > 0}
    breaks = sorted({(j + 0.5) / (n * weight) for n, weight in counts for j in range(n)})
    top = 1.0 / min(w for w in weights if w > 0)
    candidates = [0.0] + [(a + b) / 2 for a, b in zip(breaks[:-1], breaks[1:], strict=True)] + [max(top, breaks[-1] + 1.0)]
    return closest_candidate(
        candidates, lambda s: anatomy.sparsity(keep_groups(anatomy, groups, first, 0.0, layer_ratios(s, weights))), target
    )


def prune_layer(
    job: PruningJob, layer_stats: LayerStatistics, ratio: float, options: SlimGptOptions
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, list[int]]]:
    """One layer's decision: keep flags per kind, the compensated weights by tensor path, the removal order."""
    layer = job.anatomy.layers[layer_stats.index]
    flags: dict[str, torch.Tensor] = {}
    updates: dict[str, torch.Tensor] = {}
    order: dict[str, list[int]] = {}
    for name, kind in layer.kinds.items():
        tensor_slice = input_channel_slice(kind)
        n_remove = min(kind.count, round(ratio * kind.count))
        keep = torch.ones(kind.count, dtype=torch.bool)
        if n_remove:
            weight = projection_weight(layer_stats.layer, kind)  # dense [out, in], float64
            columns = unit_columns(kind.count, tensor_slice.width, tensor_slice.offset)
            groups = [1] * n_remove if kind.block == "attention" else halving_groups(n_remove)
            gram = layer_stats.grams[tensor_slice.module_path].gram
            result = obs_prune(weight, gram, columns, groups, options.damp)
            keep[result.removed] = False
            dtype = layer_stats.layer.get_submodule(tensor_slice.module_path).weight.dtype
            updates[f"{layer.prefix}.{tensor_slice.path}"] = result.weight.to(dtype).cpu()
            order[name] = result.removed
        flags[name] = keep
    return flags, updates, order


def check_dense(anatomy: ModelAnatomy) -> None:
    """SlimGPT prunes heads and dense MLP channels; routed experts are refused, naming the method."""
    for layer in anatomy.layers:
        for name, kind in layer.kinds.items():
            if input_channel_slice(kind).stacked:
                raise ValueError(
                    f"slimgpt does not prune routed experts ({name} in layer {layer.index} of this {anatomy.adapter} model); "
                    "use wanda_sp, flap or reap on mixture-of-experts models"
                )


def max_sparsity(anatomy: ModelAnatomy, options: SlimGptOptions) -> float:
    check_dense(anatomy)
    weights = depth_weights(len(anatomy.layers), options.schedule)
    return anatomy.max_sparsity([i for i, w in enumerate(weights) if w > 0])


def run(job: PruningJob) -> Iterator[Subnetwork]:
    options: SlimGptOptions = job.options
    check_dense(job.anatomy)
    weights = depth_weights(len(job.anatomy.layers), options.schedule)
    paths = sorted({input_channel_slice(kind).module_path for layer in job.anatomy.layers for kind in layer.kinds.values()})
    for target in job.targets:
        scale = scale_for_target(job.anatomy, weights, target)
        ratios = layer_ratios(scale, weights)
        keep = KeepMask.dense(job.anatomy)
        updates: dict[str, torch.Tensor] = {}
        removal: dict[str, dict[str, list[int]]] = {}
        job.masked.apply(keep)
        for layer_stats in layer_walk(job, "pruned", options.batch_size, gram_paths=paths):
            flags, layer_updates, order = prune_layer(job, layer_stats, ratios[layer_stats.index], options)
            for name, value in flags.items():
                keep[layer_stats.index, name] = value
            updates.update(layer_updates)
            removal[str(layer_stats.index)] = order
            job.masked.apply(keep, updated_weights=updates)  # layer i+1 is calibrated on the compensated layer i
        info = {"schedule": options.schedule, "scale": scale, "layer_ratios": [ratios[i] for i in range(len(weights))]}
        yield job.subnetwork(target, keep, updated_weights=dict(updates), info={**info, "removal_order": removal})


SLIMGPT = MethodSpec(
    name="slimgpt",
    description="SlimGPT: structured OBS of heads and MLP channels with Hessian compensation of the kept weights, "
    "ratio rising with depth, sequential",
    run=run,
    options=SlimGptOptions,
    calibration=CalibrationDefaults(source="c4", n_samples=128, seqlen=2048),
    nested=False,
    max_sparsity=max_sparsity,
)


@hookimpl
def gisp_methods() -> list[MethodSpec]:
    return [SLIMGPT]
