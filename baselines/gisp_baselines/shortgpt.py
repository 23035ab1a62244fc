"""ShortGPT: remove whole decoder layers ranked by Block Influence (Men et al. 2024, arXiv 2403.03853).

The Block Influence of decoder layer ``i`` is one minus the mean cosine similarity of the hidden state
entering it and the one leaving it, over the (non-padding) calibration tokens:
``BI_i = 1 - 1/T * sum over tokens t of cos(x_i[t], x_{i+1}[t])``. A layer that barely turns the residual
stream has a low BI; the layers with the lowest BI go first. Layers are removed whole (the ``"layer"``
structure kind): the compacted model has fewer layers, renumbered.

A target is a parameter sparsity (method.md); layers may differ in size (dense and MoE layers mixed,
pruned widths), so the number of layers removed is the one whose removal lands closest to the target,
always keeping at least one layer. The subnetworks are nested: removing more layers keeps going down the
same ranking, and ``job.trajectory`` records one step per removed layer.

Options:

- ``iterative`` (default ``False``): ``False`` ranks every layer once on the dense model, as the paper
  and the reference code do; ``True`` removes one layer at a time and measures BI again on the model
  without it before choosing the next (one calibration pass per removed layer).
- ``batch_size`` (default 8): calibration sequences per forward pass; results do not depend on it.

Calibration: the paper's code pushes PG19 validation books through in windows of 256 tokens; PG19 is not
one of our sources, so the default is C4, 128 windows of 256 tokens (``--calibration`` chooses another).
The GISP reference baseline (``pruners/shortGPT_sp.py``) removes layers until the sparsity first reaches
the target; we take the count closest to it, like every other method here.

BI comes from one plain forward pass of the decoder (no LM head) per batch with a hook on every decoder
layer, rather than the sequential engine: the ranking needs no decision between layers, each layer's input
and output are at hand in the hook, nothing is held between batches but the sums, and activation memory
is one batch's, whatever the depth (the sequential engine holds the whole calibration set's hidden
states). ``BlockInfluence`` keeps sums (cosines and token counts), so batches and data-parallel ranks
combine with ``merge``. The hook sees the last layer's own output; the paper's code takes transformers'
``hidden_states``, whose last entry has already passed the final norm, so its BI of the last layer differs.

Sample: ``gisp prune --model HuggingFaceTB/SmolLM2-135M --method shortgpt --sparsity 0.2,0.3``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from gisp_baselines.walk import pad_token_id
from gisp_plugin.anatomy.structures import WHOLE_LAYER, KeepMask, ModelAnatomy
from gisp_plugin.calibration.recorder import batch_size_for
from gisp_plugin.data.api import CalibrationSet
from gisp_plugin.distributed.context import is_main_process
from gisp_plugin.distributed.data_parallel import merged_over_ranks, rank_share
from gisp_plugin.finite import NonFiniteError
from gisp_plugin.methods.api import CalibrationDefaults, MethodSpec, PruningJob, Subnetwork
from gisp_plugin.plugins import hookimpl


@dataclass(frozen=True)
class ShortGptOptions:
    """Options of ShortGPT (see the module docstring)."""

    iterative: bool = False
    batch_size: int = 8


class BlockInfluence:
    """Per decoder layer: the sum over calibration tokens of cos(layer input, layer output), and the count.

    Sums, not means, so that batches and data-parallel ranks combine exactly with ``merge``.
    """

    def __init__(self, layers: int):
        self.cosine_sum = torch.zeros(layers, dtype=torch.float64)  # [layers]
        self.tokens = torch.zeros(layers, dtype=torch.long)  # [layers]

    def update(self, layer: int, hidden_in: torch.Tensor, hidden_out: torch.Tensor, token_mask: torch.Tensor) -> None:
        """Add one batch: hidden states ``[batch, seq, hidden]`` before and after ``layer``; ``token_mask``
        (bool ``[batch, seq]``) flags real tokens."""
        cosine = F.cosine_similarity(hidden_in.float(), hidden_out.float(), dim=-1)  # [batch, seq]
        if not bool(torch.isfinite(cosine).all()):
            raise NonFiniteError(f"decoder layer {layer} gives inf or NaN hidden states on the calibration data")
        mask = token_mask.to(cosine.device)
        self.cosine_sum[layer] += float(cosine[mask].double().sum())
        self.tokens[layer] += int(mask.sum())

    def merge(self, other: BlockInfluence) -> None:
        """Fold another accumulator over the same layers (another batch range, another rank) into this one."""
        if other.cosine_sum.shape != self.cosine_sum.shape:
            raise ValueError(f"cannot merge block influence of {other.cosine_sum.numel()} layers into {self.cosine_sum.numel()}")
        self.cosine_sum += other.cosine_sum
        self.tokens += other.tokens

    @property
    def scores(self) -> torch.Tensor:
        """``BI_i = 1 - mean cosine`` per layer (float64 ``[layers]``)."""
        if bool((self.tokens == 0).any()):
            raise ValueError("block influence needs at least one calibration token per layer")
        return 1.0 - self.cosine_sum / self.tokens


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def block_influence(
    model: nn.Module, layers: nn.ModuleList, calibration: CalibrationSet, batch_size: int = 8, pad_id: int = 0
) -> BlockInfluence:
    """BI statistics of every decoder layer over ``calibration``, from forward passes of ``model`` as it is
    (masked layers included: a removed layer is the identity and scores 0).

    Under torchrun each rank measures its share of the calibration set and the ranks' sums are merged,
    so every rank ranks the layers alike."""
    totals = BlockInfluence(len(layers))
    calibration, _ = rank_share(calibration)
    token_mask: list[torch.Tensor] = []  # the current batch's real tokens

    def hook(index: int):
        def record(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
            hidden_in = args[0] if args else kwargs["hidden_states"]
            totals.update(index, hidden_in, _hidden(output), token_mask[0])

        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    decoder = getattr(model, "base_model", model)  # no LM head: logits [batch, seq, vocab] are not needed
    device = next(model.parameters()).device
    size = batch_size_for(calibration, batch_size)
    try:
        batches = calibration.batches(size, pad_id)
        for batch in tqdm(batches, desc="block influence", total=-(-len(calibration) // size), disable=not is_main_process()):
            batch = batch.to(device)
            token_mask[:] = [batch.attention_mask.bool()]
            decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return merged_over_ranks({"bi": totals})["bi"]


def without_layers(anatomy: ModelAnatomy, removed: list[int]) -> KeepMask:
    """The dense model less the decoder layers ``removed``."""
    keep = KeepMask.dense(anatomy, layers=True)
    for index in removed:
        keep[index, WHOLE_LAYER] = torch.zeros(1, dtype=torch.bool)
    return keep


def layers_for_target(anatomy: ModelAnatomy, order: list[int], target: float) -> int:
    """How many layers of ``order`` to remove for the sparsity closest to ``target`` (ties: fewer)."""
    sparsities = [anatomy.sparsity(without_layers(anatomy, order[:count])) for count in range(len(order) + 1)]
    return min(range(len(sparsities)), key=lambda count: (abs(sparsities[count] - target), count))


def _removal_order(job: PruningJob, options: ShortGptOptions) -> tuple[list[int], list[float]]:
    """Layers in removal order with the BI each had when chosen, far enough to pass the largest target."""
    layers = job.adapter.decoder_layers(job.model)
    pad_id = pad_token_id(job.tokenizer)
    if not options.iterative:
        scores = block_influence(job.model, layers, job.calibration, options.batch_size, pad_id).scores
        order = torch.sort(scores, stable=True).indices.tolist()[: len(layers) - 1]  # ties: lower index first
        return order, [float(scores[i]) for i in order]
    order: list[int] = []
    chosen: list[float] = []
    while len(order) < len(layers) - 1 and job.anatomy.sparsity(without_layers(job.anatomy, order)) < max(job.targets):
        job.masked.apply(without_layers(job.anatomy, order))
        scores = block_influence(job.model, layers, job.calibration, options.batch_size, pad_id).scores
        remaining = [i for i in range(len(layers)) if i not in order]
        lowest = min(remaining, key=lambda i: (float(scores[i]), i))
        order.append(lowest)
        chosen.append(float(scores[lowest]))
    return order, chosen


def max_sparsity(anatomy: ModelAnatomy, options: ShortGptOptions) -> float:
    """Every layer but one removed, the largest staying (the worst case before the ranking is known)."""
    if any(layer.whole is None for layer in anatomy.layers):
        raise ValueError(f"shortgpt removes whole layers; the {anatomy.adapter} anatomy declares none")
    return 1.0 - max(layer.dense_params for layer in anatomy.layers) / anatomy.dense_params


def run(job: PruningJob) -> Iterator[Subnetwork]:
    options: ShortGptOptions = job.options
    if options.batch_size < 1:
        raise ValueError(f"shortgpt option batch_size must be >= 1, got {options.batch_size}")
    if job.calibration is None:
        raise ValueError("shortgpt needs calibration data; pass calibration= or a calibration source")
    order, influence = _removal_order(job, options)
    counts = [layers_for_target(job.anatomy, order, target) for target in job.targets]
    for count in range(1, max(counts) + 1):  # one trajectory step per removed layer, in ranking order
        keep = without_layers(job.anatomy, order[:count])
        info = {"removed_layer": order[count - 1], "block_influence": influence[count - 1]}
        job.trajectory.record(keep, job.anatomy.sparsity(keep), **info)
    for target, count in zip(job.targets, counts, strict=True):
        keep = without_layers(job.anatomy, order[:count])
        job.masked.apply(keep)
        chosen = dict(zip(order[:count], influence[:count], strict=True))
        yield job.subnetwork(target, keep, info={"removed_layers": sorted(chosen), "block_influence": chosen})


SHORTGPT = MethodSpec(
    name="shortgpt",
    description="ShortGPT: whole decoder layers removed, lowest Block Influence (1 - cos(layer input, output)) first",
    run=run,
    options=ShortGptOptions,
    calibration=CalibrationDefaults(source="c4", n_samples=128, seqlen=256),
    nested=True,
    max_sparsity=max_sparsity,
)


@hookimpl
def gisp_methods() -> list[MethodSpec]:
    return [SHORTGPT]
