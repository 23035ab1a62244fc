"""Minitron: activation-based width and depth pruning (Muralidharan et al. 2024, arXiv 2407.14679; reference:
NVIDIA ModelOpt's ``mcore_minitron`` mode).

Importance comes from forward passes only, over the calibration set:

- an attention head: its output, the input of ``o_proj`` (the head's ``head_dim`` channels);
- an MLP channel: its activation, the input of ``down_proj``;
- a hidden channel: the outputs of the norms that feed each layer's attention and MLP (``input_layernorm``
  and the pre-MLP norm; found as the norms inside a layer whose output a module reads, not by name);
- a decoder layer: ``1 - cos(layer input, layer output)`` averaged over tokens (ModelOpt's depth score).

Aggregation, as the paper's best choice and the reference: for every channel, ``|activation|`` averaged over
a sequence's tokens, then the L2 norm of that over the calibration samples (``sqrt(sum_b mean_s(|a|)^2)``).
A head scores the L2 norm of its channels' scores; a hidden channel the sum of its scores over the norms.
The statistics are sums over samples (``ActivationNorms``), so batches and torchrun ranks merge exactly.

Pruning is uniform, as the paper and the reference: every layer keeps the same number of heads (the same in
every key/value group, chosen within the group as the reference ranks them), of MLP channels (a multiple of
``channel_divisor``), and the model keeps ``hidden_size`` channels (a multiple of ``channel_divisor`` and of the
head count, which the families' configs require); depth pruning removes the layers of lowest score. The axes
pruned are the option ``prune``, named as the reference's export config names them: ``hidden_size``,
``ffn_hidden_size``, ``num_attention_heads``, ``num_layers``, joined with ``+``. The default
``ffn_hidden_size+hidden_size`` is the paper's best width recipe (MINITRON 8B: MLP and embedding channels);
``num_attention_heads`` adds heads (MINITRON 4B), ``num_layers`` alone is its depth pruning. For a sparsity
target, all chosen axes keep the same fraction of their units, the fraction whose rounded widths land closest
to the target.

Differences from the reference, and why: targets are parameter sparsities (method.md) rather than explicit
widths; the depth score averages cosines over real tokens instead of summing per-batch means (the same ranking
up to batch weighting, and independent of the batch split); each sequence's mean runs over its real tokens
(the reference's include padding). Minitron then retrains with distillation; here the masked model equals its
compaction exactly (``compaction.hidden``), and recovery is the optional LoRA step. Layers with routed experts
are refused (the reference ranks whole experts, which this plugin does not implement).

Options: ``prune``, ``channel_divisor`` (default 64, ModelOpt's ``hidden_size_divisor`` and
``ffn_hidden_size_divisor``), ``batch_size`` (default 8; results do not depend on it).
Sample: ``gisp prune --model HuggingFaceTB/SmolLM2-135M --method minitron --sparsity 0.2 -o channel_divisor=8``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from gisp_baselines.channels import input_channel_slice
from gisp_baselines.shortgpt import BlockInfluence
from gisp_baselines.walk import pad_token_id
from gisp_plugin.anatomy.structures import HIDDEN_CHANNEL, MODEL_LEVEL, WHOLE_LAYER, KeepMask, ModelAnatomy
from gisp_plugin.calibration.recorder import batch_size_for
from gisp_plugin.compaction.hidden import stream_probe
from gisp_plugin.distributed.context import is_main_process
from gisp_plugin.distributed.data_parallel import merged_over_ranks, rank_share
from gisp_plugin.methods.api import CalibrationDefaults, MethodSpec, PruningJob
from gisp_plugin.plugins import hookimpl

AXES = ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_layers")
KIND_OF_AXIS = {"ffn_hidden_size": "mlp", "num_attention_heads": "attention"}


@dataclass(frozen=True)
class MinitronOptions:
    """Options of Minitron (see the module docstring)."""

    prune: str = "ffn_hidden_size+hidden_size"
    channel_divisor: int = 64
    batch_size: int = 8

    def __post_init__(self) -> None:
        unknown = [axis for axis in self.prune.split("+") if axis not in AXES]
        if unknown or not self.prune:
            raise ValueError(f"minitron option prune={self.prune!r}: join some of {', '.join(AXES)} with '+'")
        if self.channel_divisor < 1 or self.batch_size < 1:
            raise ValueError("minitron options channel_divisor and batch_size must be >= 1")

    @property
    def axes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.prune.split("+")))


class ActivationNorms:
    """Per named activation: the sum over calibration sequences of ``(mean over its tokens of |a|)^2``.

    ``sqrt`` of it is the reference's aggregation (mean over the sequence, L2 norm over the batch).
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}

    def update(self, name: str, activations: torch.Tensor, token_mask: torch.Tensor) -> None:
        """Add one batch: ``activations`` ``[batch, seq, d]``, ``token_mask`` (bool ``[batch, seq]``) real tokens."""
        mask = token_mask.to(activations.device, torch.float64)  # [batch, seq]
        # one batched product sums the real tokens, instead of a masked float64 copy of the activations
        sums = torch.bmm(mask[:, None, :], activations.detach().abs().double()).squeeze(1)  # [batch, d]
        means = sums / mask.sum(1, keepdim=True).clamp_min(1)
        squares = means.pow(2).sum(0).cpu()
        self.sums[name] = self.sums[name] + squares if name in self.sums else squares

    def merge(self, other: ActivationNorms) -> None:
        for name, value in other.sums.items():
            self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()

    def norm(self, name: str) -> torch.Tensor:
        return self.sums[name].sqrt()


@dataclass(frozen=True)
class Importance:
    """Per-unit scores: heads and MLP channels per layer, hidden channels, and layers (higher: more important)."""

    heads: dict[int, torch.Tensor]
    channels: dict[int, torch.Tensor]
    hidden: torch.Tensor | None
    layers: torch.Tensor


def _kind_name(anatomy: ModelAnatomy, layer: int, block: str) -> str:
    return next(name for name, kind in anatomy.layers[layer].kinds.items() if kind.block == block)


def _pre_norms(job: PruningJob) -> list[str]:
    """The norms inside the decoder layers whose output a module reads (the attention and MLP inputs)."""
    hidden = job.anatomy.hidden_dimension()
    first = job.model.get_submodule(job.anatomy.layers[0].prefix)
    read, _ = stream_probe(job.model, first, hidden)
    inside = tuple(f"{layer.prefix}." for layer in job.anatomy.layers)
    return [path for path in hidden.norms if path in read and path.startswith(inside)]


@torch.no_grad()
def importance(job: PruningJob, options: MinitronOptions) -> Importance:
    """Minitron's scores from forward passes of the dense model over this rank's share of the calibration set,
    merged over ranks (every rank gets the same scores)."""
    anatomy, model = job.anatomy, job.model
    norms = ActivationNorms()
    influence = BlockInfluence(len(anatomy.layers))
    token_mask: list[torch.Tensor] = []
    watched: dict[nn.Module, str] = {}
    for layer in anatomy.layers:
        for block in ("attention", "mlp"):
            path = input_channel_slice(anatomy.kind(layer.index, _kind_name(anatomy, layer.index, block))).module_path
            watched[model.get_submodule(f"{layer.prefix}.{path}")] = f"{layer.index}:{block}"

    def on_input(module, args):
        norms.update(watched[module], args[0], token_mask[0])

    def on_norm(path: str):
        return lambda module, args, output: norms.update(f"norm:{path}", output, token_mask[0])

    def on_layer(index: int):
        def record(module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            influence.update(index, hidden_in, output[0] if isinstance(output, (tuple, list)) else output, token_mask[0])

        return record

    pre_norms = _pre_norms(job) if "hidden_size" in options.axes else []  # a probe pass, before the hooks
    handles = [module.register_forward_pre_hook(on_input) for module in watched]
    handles += [model.get_submodule(path).register_forward_hook(on_norm(path)) for path in pre_norms]
    handles += [
        model.get_submodule(layer.prefix).register_forward_hook(on_layer(layer.index), with_kwargs=True)
        for layer in anatomy.layers
    ]
    calibration, _ = rank_share(job.calibration)
    size = batch_size_for(calibration, options.batch_size)
    try:
        batches = calibration.batches(size, pad_token_id(job.tokenizer))
        for batch in tqdm(batches, desc="minitron importance", total=-(-len(calibration) // size), disable=not is_main_process()):
            batch = batch.to(job.device)
            token_mask[:] = [batch.attention_mask.bool()]
            getattr(model, "base_model", model)(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    merged = merged_over_ranks({"norms": norms, "bi": influence})
    norms, influence = merged["norms"], merged["bi"]
    heads, channels = {}, {}
    for layer in anatomy.layers:
        count = anatomy.kind(layer.index, _kind_name(anatomy, layer.index, "attention")).count
        heads[layer.index] = norms.norm(f"{layer.index}:attention").reshape(count, -1).norm(dim=1)
        channels[layer.index] = norms.norm(f"{layer.index}:mlp")
    hidden = None
    if "hidden_size" in options.axes:
        hidden = sum(norms.norm(name) for name in norms.sums if name.startswith("norm:"))
    return Importance(heads, channels, hidden, influence.scores)


def _multiple(count: int, fraction: float, divisor: int) -> int:
    """``fraction`` of ``count`` rounded down to a multiple of ``divisor``; at least one multiple (or all)."""
    if divisor >= count:
        return count
    return max(divisor, math.floor(fraction * count / divisor) * divisor)


def _top(scores: torch.Tensor, kept: int) -> torch.Tensor:
    """Bool flags of the ``kept`` highest scores (ties: lower index first)."""
    flags = torch.zeros(scores.numel(), dtype=torch.bool)
    order = torch.sort(-scores.double(), stable=True).indices
    flags[order[:kept]] = True
    return flags


def _groups(anatomy: ModelAnatomy, layer: int, name: str) -> tuple[tuple[int, ...], ...]:
    """The query heads of each key/value group (one group of all heads under plain multi-head attention)."""
    kind = anatomy.kind(layer, name)
    return kind.dependents[0].readers if kind.dependents else (tuple(range(kind.count)),)


def uniform_keep(anatomy: ModelAnatomy, scores: Importance, axes: tuple[str, ...], fraction: float, divisor: int) -> KeepMask:
    """Every chosen axis keeps ``fraction`` of its units (rounded as the module docstring says), uniformly."""
    keep = KeepMask.dense(anatomy, layers="num_layers" in axes, hidden="hidden_size" in axes)
    for layer in anatomy.layers:
        if "num_attention_heads" in axes:
            name = _kind_name(anatomy, layer.index, "attention")
            flags = torch.zeros(anatomy.kind(layer.index, name).count, dtype=torch.bool)
            for group in _groups(anatomy, layer.index, name):
                chosen = _top(scores.heads[layer.index][list(group)], max(1, math.floor(fraction * len(group))))
                flags[[group[i] for i in chosen.nonzero().flatten().tolist()]] = True
            keep[layer.index, name] = flags
        if "ffn_hidden_size" in axes:
            name = _kind_name(anatomy, layer.index, "mlp")
            channels = scores.channels[layer.index]
            keep[layer.index, name] = _top(channels, _multiple(channels.numel(), fraction, divisor))
    if "hidden_size" in axes:
        width = anatomy.hidden_dimension().width
        heads = anatomy.kind(0, _kind_name(anatomy, 0, "attention")).count
        keep[MODEL_LEVEL, HIDDEN_CHANNEL] = _top(scores.hidden, _multiple(width, fraction, math.lcm(divisor, heads)))
    if "num_layers" in axes:
        count = len(anatomy.layers)
        for index in torch.sort(scores.layers.double(), stable=True).indices[: count - max(1, round(fraction * count))].tolist():
            keep[index, WHOLE_LAYER] = torch.zeros(1, dtype=torch.bool)
    return keep


def _widths(anatomy: ModelAnatomy, axes: tuple[str, ...], fraction: float, divisor: int) -> tuple:
    """What ``uniform_keep`` keeps at ``fraction``, as counts (cheap: no masks built)."""
    widths: list = []
    if "num_attention_heads" in axes:
        sizes = {
            len(g)
            for layer in anatomy.layers
            for g in _groups(anatomy, layer.index, _kind_name(anatomy, layer.index, "attention"))
        }
        widths.append(tuple(max(1, math.floor(fraction * size)) for size in sorted(sizes)))
    if "ffn_hidden_size" in axes:
        counts = {anatomy.kind(layer.index, _kind_name(anatomy, layer.index, "mlp")).count for layer in anatomy.layers}
        widths.append(tuple(_multiple(count, fraction, divisor) for count in sorted(counts)))
    if "hidden_size" in axes:
        heads = anatomy.kind(0, _kind_name(anatomy, 0, "attention")).count
        widths.append(_multiple(anatomy.hidden_dimension().width, fraction, math.lcm(divisor, heads)))
    if "num_layers" in axes:
        widths.append(max(1, round(fraction * len(anatomy.layers))))
    return tuple(widths)


def candidate_fractions(anatomy: ModelAnatomy, options: MinitronOptions) -> list[float]:
    """One fraction per distinct set of uniform widths, the largest that gives it, from dense down (so the
    sparsities rise strictly along the list: every width is non-increasing and one of them shrinks)."""
    fractions: dict[tuple, float] = {}
    for step in range(1000, -1, -1):
        fractions.setdefault(_widths(anatomy, options.axes, step / 1000, options.channel_divisor), step / 1000)
    return list(fractions.values())


def closest_keep(
    anatomy: ModelAnatomy,
    scores: Importance,
    options: MinitronOptions,
    target: float,
    fractions: list[float] | None = None,
    measured: dict[float, tuple[KeepMask, float]] | None = None,
) -> KeepMask:
    """The uniform subnetwork whose sparsity is closest to ``target`` (ties: the larger one kept).

    The sparsity rises along ``candidate_fractions``, so a bisection finds the two candidates around the
    target (building and counting a few masks, not all of them); ``measured`` caches them across targets.
    """
    fractions = candidate_fractions(anatomy, options) if fractions is None else fractions
    measured = {} if measured is None else measured

    def at(index: int) -> tuple[KeepMask, float]:
        fraction = fractions[index]
        if fraction not in measured:
            keep = uniform_keep(anatomy, scores, options.axes, fraction, options.channel_divisor)
            measured[fraction] = keep, anatomy.sparsity(keep)
        return measured[fraction]

    lo, hi = 0, len(fractions) - 1  # the first index whose sparsity reaches the target, or the last
    while lo < hi:
        mid = (lo + hi) // 2
        if at(mid)[1] >= target:
            hi = mid
        else:
            lo = mid + 1
    best = at(lo)
    if lo > 0 and abs(at(lo - 1)[1] - target) <= abs(best[1] - target):  # a tie keeps the larger model
        best = at(lo - 1)
    return best[0]


def _check(anatomy: ModelAnatomy, options: MinitronOptions) -> None:
    blocks = {kind.block for layer in anatomy.layers for kind in layer.kinds.values()}
    if blocks - {"attention", "mlp"}:
        raise ValueError(f"minitron prunes dense MLPs; the {anatomy.adapter} model holds {sorted(blocks - {'attention', 'mlp'})}")
    if "hidden_size" in options.axes:
        anatomy.hidden_dimension()
    if "num_layers" in options.axes and any(layer.whole is None for layer in anatomy.layers):
        raise ValueError(f"minitron num_layers removes whole layers; the {anatomy.adapter} anatomy declares none")


def max_sparsity(anatomy: ModelAnatomy, options: MinitronOptions) -> float:
    """The sparsity of the smallest uniform model (which units remain changes no count)."""
    _check(anatomy, options)
    scores = Importance(
        {
            layer.index: torch.zeros(anatomy.kind(layer.index, _kind_name(anatomy, layer.index, "attention")).count)
            for layer in anatomy.layers
        },
        {
            layer.index: torch.zeros(anatomy.kind(layer.index, _kind_name(anatomy, layer.index, "mlp")).count)
            for layer in anatomy.layers
        },
        torch.zeros(anatomy.hidden.width) if anatomy.hidden is not None else None,
        torch.zeros(len(anatomy.layers)),
    )
    return anatomy.sparsity(uniform_keep(anatomy, scores, options.axes, 0.0, options.channel_divisor))


def run(job: PruningJob) -> Iterator:
    options: MinitronOptions = job.options
    _check(job.anatomy, options)
    if job.calibration is None:
        raise ValueError("minitron needs calibration data; pass calibration= or a calibration source")
    scores = importance(job, options)
    fractions, measured = candidate_fractions(job.anatomy, options), {}
    for target in job.targets:
        keep = closest_keep(job.anatomy, scores, options, target, fractions, measured)
        job.masked.apply(keep)
        widths = {
            "hidden_size": int(keep[MODEL_LEVEL, HIDDEN_CHANNEL].sum()) if "hidden_size" in options.axes else None,
            "removed_layers": keep.removed_layers(),
        }
        yield job.subnetwork(target, keep, info=widths)


MINITRON = MethodSpec(
    name="minitron",
    description="Minitron: uniform width (heads, MLP, hidden channels) and depth pruning by activation magnitudes",
    run=run,
    options=MinitronOptions,
    calibration=CalibrationDefaults(source="c4", n_samples=1024, seqlen=256),
    max_sparsity=max_sparsity,
)


@hookimpl
def gisp_methods() -> list[MethodSpec]:
    return [MINITRON]
