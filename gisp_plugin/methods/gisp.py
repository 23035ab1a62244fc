"""GISP: global iterative structured pruning with first-order Taylor scores (arXiv 2510.18030).

The algorithm, as in the paper and its reference code (``uncc-efficient-ai/GISP``,
``pruners/grad_sp_global.py``), with the choices of ``docs/method.md``:

1. **Gradient**: on the current (masked) model, the gradient of the calibration loss averaged over the
   whole calibration set, ``g = sum of batch gradients / n_samples``, accumulated in float32.
2. **Per-weight score** ``s = |W * g|`` (``W`` the dense weight; the abs is taken after accumulation).
3. **Structure score**: the sum of ``s`` over the weights a structure owns: an attention head's ``q_proj``
   rows and ``o_proj`` columns (plus ``k_proj``/``v_proj`` rows without GQA), an MLP channel's
   ``gate_proj``/``up_proj`` rows and ``down_proj`` column. Under GQA the unit is a query head.
4. **Block-wise normalisation** (``normalize``), so that heads and channels can share one ranking.
5. **Protected layers** (``protect``) score ``+inf`` and are never pruned.
6. **Global ranking**: prune the lowest-scoring heads and channels of the whole model.
7. **Schedule**: ``steps`` gradient recomputations, from 0 to the largest target in parameter
   sparsity (``schedule``: linear by default, cosine, exponential, or adaptive to the calibration
   loss; ``gisp_schedules``). Pruned structures have a zero gradient through their mask, so they stay
   pruned: every cut is nested in the previous one, and one run gives every target. ``steps=1`` is
   one-shot pruning.

Schedule detail: step ``i`` recomputes gradients at the sparsity step ``i - 1`` reached and cuts to the
schedule's next end (linear: ``top * (i + 1) / steps``); a requested target that falls inside a step is
cut from that same step's scores, so it is hit exactly (to within one structure) and ``steps=1`` cuts
every target from the dense model's scores. The reference instead schedules the fraction of
*structures* and picks the step closest to each target.

Options from the reference (``pruners/grad_sp_global.py``) and where we differ:

- ``taylor``: ``param_first`` ``|W * g|`` (default), ``param_second`` ``|W * acc * W|``, ``param_mix``
  ``|W * g - 0.5 * W * acc * W|`` with ``acc`` the mean squared per-sample gradient (the salience
  shared with LLM-Pruner, ``gisp_plugin.importance.taylor``), abs per element, summed per structure and
  normalised alike. The reference reads LLM-Pruner's ``weight.acc_grad`` for the second-order terms but
  its GISP gradient pass does not fill it; we compute it (one sequence per backward, as LLM-Pruner).
- ``rank=separate`` (reference ``prune_separate``): heads ranked among heads, channels among channels.
  The reference prunes the same fraction of *structures* of each block type; we prune the same fraction
  of each pool's *parameters* (``prune_lowest_per_pool``), so that the total is the requested parameter
  sparsity (for plain multi-head attention the two fractions are the same thing).
- ``blocks`` (reference ``prune_modules=all|mha|mlp``): ``attention``, ``mlp``, or finer block types.
  On a mixture of experts, ``mlp`` means every feed-forward channel: dense MLP, shared-expert and
  routed-expert channels (the reference knows dense models only; its ``mlp`` is "everything but
  attention"); ``shared_expert`` and ``expert_mlp`` name one of them.
- ``+hidden`` (not in the reference, off by default): hidden channels (the residual stream's width,
  ``anatomy.hidden``) join the one global list, block type ``hidden``. A channel's score is ``|W * g|``
  summed over every weight it owns (its column of q/k/v, gate/up and the embedding, its row of o/down, its
  norm entries, its LM-head column). Channels go in groups of ``hidden_divisor`` (the ranked order's
  lowest first; a group scores the mean of its channels), so the kept width stays a multiple of the head
  count, which Llama's config requires; the highest group always stays. Unlike heads and channels, a hidden
  channel is cut in every layer, protected ones included. Each unit's dense parameter count overstates what
  a cut frees once both kinds go (a hidden channel's share of a removed head counts twice), so the same
  ranking is cut where the exact count (``anatomy.sparsity``) is closest to the target (``cut_exact``).
- ``schedule``: see ``gisp_schedules`` (the reference's first step prunes nothing; ours cut at every step).

Every cut is recorded in ``job.trajectory``. With a ``work_dir``, the state after every finished step
is written atomically to ``gisp-state.json``; a rerun with the same model, options, shape, calibration data,
targets and seed resumes from the last finished step and gives identical results (under ``torchrun``
rank 0 alone reads and writes the state; every rank resumes from what rank 0 read). A state from a
different run is ignored (with a warning) and overwritten. Every step records ``elapsed_s``, the GISP
time up to it across interruptions, so a resumed run reports its whole pruning time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from gisp_plugin.anatomy.hidden import HIDDEN_BLOCK
from gisp_plugin.anatomy.structures import HIDDEN_CHANNEL, MODEL_LEVEL, KeepMask, ModelAnatomy, StructureKind
from gisp_plugin.checkpoint.method_state import job_fingerprint, read_state, write_state
from gisp_plugin.checkpoint.trajectory import Trajectory
from gisp_plugin.data.api import CalibrationSet
from gisp_plugin.distributed.context import is_main_process
from gisp_plugin.distributed.data_parallel import from_main
from gisp_plugin.finite import NonFiniteError
from gisp_plugin.importance.allocation import (
    Groups,
    Scores,
    UnreachableTargetError,
    prune_lowest_globally,
    prune_lowest_per_pool,
)
from gisp_plugin.importance.gradients import GradientSums, accumulate_gradients, weight_paths, weight_tensor
from gisp_plugin.importance.structure_scores import kind_scores, model_scores
from gisp_plugin.importance.taylor import needs_squares, salience, sharding_refusal
from gisp_plugin.methods.api import CalibrationDefaults, MethodSpec, PruningJob, Subnetwork
from gisp_plugin.methods.gisp_schedules import SCHEDULES, Cut, Schedule, step_cuts
from gisp_plugin.plugins import hookimpl
from gisp_plugin.plugins.manager import lookup

log = logging.getLogger(__name__)

STATE_FILE = "gisp-state.json"
STATE_FORMAT = "gisp-state/1"
NORMALIZATIONS = ("reference", "param_mean", "block_mean", "none")
GROUPINGS = ("experts", "kv")
CHANNEL_BLOCKS = ("mlp", "shared_expert", "expert_mlp")
HIDDEN_KEY = (MODEL_LEVEL, HIDDEN_CHANNEL)
TAYLOR = ("param_first", "param_second", "param_mix")
RANKINGS = ("global", "separate")


@dataclass(frozen=True)
class GispOptions:
    """Options of GISP (``--option name=value``).

    steps: gradient recomputations along the schedule (default 16). The reference uses 112 steps to 70% of
        the structures (~0.6% each), one full calibration pass per step. On SmolLM2 (benchmarks/gisp_steps.py,
        16 x 128 LAMBADA tokens) 16 steps cut BoolQ-passage perplexity at 50% sparsity from 318 (one-shot)
        to 257, while 32 steps gave no further gain (272) at twice the cost. ``1`` is one-shot pruning.
    normalize: ``reference`` (heads / (4 * head_dim * hidden), channels / (3 * intermediate_size), as the
        reference code; channels of a shared or routed expert / (3 * that expert's width), the same rule per
        MLP), ``param_mean`` (each unit / its parameter count), ``block_mean`` (each block type / its mean
        over the live, unprotected units; block types: attention, mlp, shared_expert, expert_mlp), ``none``.
    group: ``none`` (default: heads and channels rank one by one; a routed expert goes with its last
        channel), ``experts`` (each routed expert ranks as one unit, scored by the sum of its channels'
        normalised scores), ``kv`` (each key/value group of query heads ranks as one unit), ``experts+kv``.
    blocks: ``all``, ``attention``, ``mlp`` (every feed-forward channel: dense MLP, shared-expert and
        routed-expert channels), or block types joined by ``+`` (``attention+shared_expert``;
        ``expert_mlp`` with ``group=experts`` prunes whole experts only); the others are kept whole.
        ``+hidden`` adds the hidden channels to the ranking (``all+hidden``; ``hidden`` alone cuts only the
        width), block type ``hidden``; off by default. ``normalize=reference`` and ``param_mean`` divide a
        hidden channel's score by the weights it owns (embedding and LM-head columns included; the reference
        has no hidden kind). Under ``reference`` the channel divisor (3 * intermediate_size) shrinks MLP
        scores, and on SmolLM2 no hidden channel ranks low enough to go: use ``param_mean`` or
        ``block_mean`` with it (docs/hidden_dimension.md). Needs ``rank=global`` and the free shape.
    hidden_divisor: with ``+hidden``, channels go in groups of this many, so the kept width is a multiple
        of it; ``0`` (default): the query heads of a layer (Llama and kin require a multiple of them).
    taylor: per-weight score: ``param_first`` ``|W * g|`` (default), ``param_second`` ``|W * acc * W|``,
        ``param_mix`` ``|W * g - 0.5 * W * acc * W|`` (``acc``: mean squared per-sample gradient; these
        two run one sequence per backward, so ``batch_size`` is ignored and a step costs more).
    rank: ``global`` (default: every head and channel in one ranking) or ``separate`` (heads among
        heads, channels among channels; each pool loses the same fraction of its parameters).
    schedule: ``linear`` (default), ``cosine``, ``exponential`` (``exp_alpha`` > 0: large steps first,
        < 0: small steps first; default 3), ``adaptive`` (step sizes from the calibration loss measured
        at every step; ``adaptive_limit``, default 2, bounds a step to [1/limit, limit] x an even split
        of what remains). Every schedule makes ``steps`` gradient passes and hits every target.
        Sample: ``gisp prune --method gisp --sparsity 0.3,0.5 -o steps=8 -o schedule=adaptive``.
    protect: layers never pruned: ``reference`` (outside ``range(int(0.1 * L), L - 1)``), ``none``, or a
        list such as ``0,1,2,29`` or ``0-2,29``.
    loss: calibration objective, a loss plugin: ``ntp`` (text), ``margin`` (multiple choice),
        ``answer_ntp`` (question/answer); ``gisp methods --all`` lists them (``gisp_plugin.importance.losses``).
    batch_size: sequences per forward/backward (reference 2); only memory and speed depend on it.
    gradient_checkpointing: recompute layer activations in backward: less activation memory for more time
        (SmolLM2, 4 x 256 tokens per micro-batch, CPU: peak RSS 3.4 -> 2.8 GiB, +16% time).

    Device and dtype are the model's (``gisp prune --device cuda --dtype bfloat16``); gradients are
    accumulated in float32 whatever the dtype. Only the prunable linear weights get gradients.
    """

    steps: int = 16
    normalize: Literal["reference", "param_mean", "block_mean", "none"] = "reference"
    protect: str = "reference"
    loss: str = "ntp"
    batch_size: int = 2
    gradient_checkpointing: bool = False
    group: str = "none"
    blocks: str = "all"
    taylor: Literal["param_first", "param_second", "param_mix"] = "param_first"
    rank: Literal["global", "separate"] = "global"
    schedule: Literal["linear", "cosine", "exponential", "adaptive"] = "linear"
    exp_alpha: float = 3.0
    adaptive_limit: float = 2.0
    hidden_divisor: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps={self.steps} must be >= 1 (1 is one-shot pruning)")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize={self.normalize!r} is not one of {', '.join(NORMALIZATIONS)}")
        protected_layers(10**6, self.protect)  # syntax check; the range is checked against the model later
        unknown = set(self.groupings) - set(GROUPINGS)
        if unknown:
            raise ValueError(f"group={self.group!r}: give none, or {' / '.join(GROUPINGS)} joined by +")
        names = self._block_names
        known = {"all", "attention", "mlp", *CHANNEL_BLOCKS, HIDDEN_BLOCK}
        if names - known or ("all" in names and names - {"all", HIDDEN_BLOCK}):
            raise ValueError(
                f"blocks={self.blocks!r}: give all, or block types joined by +: attention, {', '.join(CHANNEL_BLOCKS)}, "
                f"{HIDDEN_BLOCK} (all+{HIDDEN_BLOCK} ranks hidden channels too)"
            )
        if self.hidden_divisor < 0:
            raise ValueError(f"hidden_divisor={self.hidden_divisor} must be >= 0 (0: the query heads of a layer)")
        if self.ranks_hidden and self.rank != "global":
            raise ValueError(f"blocks={self.blocks!r} ranks hidden channels in the one global list; give rank=global")
        choices = {"taylor": TAYLOR, "rank": RANKINGS, "schedule": SCHEDULES}
        for name, valid in choices.items():
            value = getattr(self, name)
            if value not in valid:
                raise ValueError(f"{name}={value!r} is not one of {', '.join(valid)}")
        self.schedule_for(1.0)  # checks exp_alpha and adaptive_limit
        lookup("loss", self.loss)  # an unknown name fails here, listing the available losses

    @property
    def groupings(self) -> tuple[str, ...]:
        return () if self.group.strip().lower() in ("none", "") else tuple(p.strip() for p in self.group.split("+"))

    @property
    def _block_names(self) -> set[str]:
        return {p.strip().lower() for p in self.blocks.split("+")}

    @property
    def ranks_hidden(self) -> bool:
        """Whether hidden channels join the ranking (``blocks=...+hidden``)."""
        return HIDDEN_BLOCK in self._block_names

    @property
    def prunable_blocks(self) -> set[str] | None:
        """The decoder-layer block types that may be pruned (``None``: all); ``mlp`` stands for every channel
        block. Hidden channels are not a layer block: see ``ranks_hidden``."""
        names = self._block_names - {HIDDEN_BLOCK}
        if names == {"all"}:
            return None
        return names - {"mlp"} | set(CHANNEL_BLOCKS) if "mlp" in names else names

    def schedule_for(self, top: float) -> Schedule:
        """The schedule of this run's ``steps`` to the largest target ``top``."""
        return Schedule(self.schedule, self.steps, top, self.exp_alpha, self.adaptive_limit)


def ranking_pool(block: str, blocks: set[str] | None = None) -> str | None:
    """The pool a block type ranks in under ``rank=separate``: ``attention`` or ``mlp`` (every channel
    block); ``None`` for a block type that ``blocks`` keeps whole."""
    if blocks is not None and block not in blocks:
        return None
    return "attention" if block == "attention" else "mlp"


# --- protected layers and schedule -----------------------------------------------------------------------


def protected_layers(n_layers: int, protect: str | list[int] | tuple[int, ...]) -> list[int]:
    """The layer indices ``protect`` names for a model with ``n_layers`` decoder layers."""
    if isinstance(protect, list | tuple):
        layers = [int(i) for i in protect]
    elif protect == "reference":
        keep_range = range(int(0.1 * n_layers), n_layers - 1)
        return [i for i in range(n_layers) if i not in keep_range]
    elif protect.strip().lower() in ("none", ""):
        return []
    else:
        layers = []
        for part in protect.split(","):
            first, sep, last = part.strip().partition("-")
            try:
                layers += list(range(int(first), int(last) + 1)) if sep else [int(first)]
            except ValueError as err:
                raise ValueError(
                    f"protect={protect!r}: give 'reference', 'none' or layer indices such as 0,1,2,29 or 0-2,29"
                ) from err
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"protect={protect!r}: layer {bad[0]} does not exist (the model has layers 0..{n_layers - 1})")
    return sorted(set(layers))


def max_sparsity(anatomy: ModelAnatomy, options: GispOptions) -> float:
    """The largest reachable target: every structure of the unprotected layers pruned; with
    ``rank=separate``, until the pool with the smallest prunable share is used up."""
    protected = set(protected_layers(len(anatomy.layers), options.protect))
    unprotected = [i for i in range(len(anatomy.layers)) if i not in protected]
    blocks = options.prunable_blocks
    if options.ranks_hidden:  # every prunable unit gone and the hidden width down to one group
        keep = KeepMask.dense(anatomy, hidden=True)
        for idx in unprotected:
            for name, kind in anatomy.layers[idx].kinds.items():
                if blocks is None or kind.block in blocks:
                    keep[idx, name] = torch.zeros_like(keep[idx, name])
        flags = torch.zeros(anatomy.hidden_dimension().width, dtype=torch.bool)
        flags[: hidden_divisor(anatomy, options)] = True
        keep[HIDDEN_KEY] = flags
        return anatomy.sparsity(keep)
    if options.rank == "global":
        return anatomy.max_sparsity(unprotected, blocks)
    pools: dict[str, set[str]] = {}  # pool -> its block types
    size: dict[str, int] = {}  # pool -> its parameters in all decoder layers
    for layer in anatomy.layers:
        for kind in layer.kinds.values():
            pool = ranking_pool(kind.block, blocks)
            if pool is not None:
                pools.setdefault(pool, set()).add(kind.block)
                size[pool] = size.get(pool, 0) + kind.dense_params
    if not pools:
        return 0.0
    share = min(anatomy.max_sparsity(unprotected, b) * anatomy.dense_params / size[pool] for pool, b in pools.items())
    return share * sum(size.values()) / anatomy.dense_params


def hidden_divisor(anatomy: ModelAnatomy, options: GispOptions) -> int:
    """How many hidden channels go at once (``+hidden``): the option, or the query heads of a layer; refused
    where the model declares no hidden dimension, where the width is not a multiple of it, or under a shape."""
    try:
        width = anatomy.hidden_dimension().width
    except LookupError as err:
        raise ValueError(f"blocks={options.blocks!r}: {err}") from None
    if anatomy.shape != "free":
        raise ValueError(f"blocks={options.blocks!r} needs the free shape (shape {anatomy.shape} constrains layer kinds only)")
    divisor = options.hidden_divisor or next(
        (kind.count for layer in anatomy.layers for kind in layer.kinds.values() if kind.block == "attention"), 1
    )
    if width % divisor:
        raise ValueError(f"hidden_divisor={divisor} does not divide the hidden size {width}; give -o hidden_divisor=N")
    return divisor


def check_options(anatomy: ModelAnatomy, options: GispOptions) -> None:
    """Every step cuts at least one structure: more steps than prunable structures would only repeat
    gradient passes (hours on a large model) that cut nothing. ``+hidden`` needs a hidden dimension it can cut
    in groups (``hidden_divisor``)."""
    protected = set(protected_layers(len(anatomy.layers), options.protect))
    blocks = options.prunable_blocks
    structures = sum(
        kind.count
        for layer in anatomy.layers
        if layer.index not in protected
        for kind in layer.kinds.values()
        if blocks is None or kind.block in blocks
    )
    if options.ranks_hidden:
        structures += anatomy.hidden_dimension().width // hidden_divisor(anatomy, options) - 1
    if options.steps > structures:
        raise ValueError(
            f"steps={options.steps} is more than the {structures} structures gisp may prune in this model "
            f"(each step cuts at least one); give -o steps={structures} or fewer"
        )


# --- scores ----------------------------------------------------------------------------------------------


def structure_scores(
    model: nn.Module, anatomy: ModelAnatomy, sums: GradientSums, taylor: str = "param_first", hidden: bool = False
) -> Scores:
    """Raw GISP scores per unit (float64): ``|salience|`` (``|W * g|`` for ``param_first``) summed over
    the weight matrices each unit owns; with ``hidden``, also the hidden channels under ``HIDDEN_KEY``
    (summed over every weight a channel owns, norms and embeddings included).

    Biases are not scored (the reference scores weights only). A masked unit's gradient (and squared
    gradient) is zero, so its score is exactly zero.
    """

    def element_score(path: str, tensor: torch.Tensor) -> torch.Tensor:
        if path not in sums.grad:
            return torch.zeros(tensor.shape, dtype=torch.float32, device=tensor.device)
        acc = sums.grad_sq[path] if sums.grad_sq is not None else None
        return salience(tensor, sums.grad[path], acc, taylor).abs()

    scores = model_scores(model, anatomy, element_score)
    if hidden:
        scores[HIDDEN_KEY] = kind_scores(model, anatomy.hidden_dimension().kind, element_score)
    return scores


def gradient_paths(anatomy: ModelAnatomy, hidden: bool = False) -> list[str]:
    """The weights GISP needs gradients of: those the layer kinds own, and with ``hidden`` every weight a
    hidden channel owns (key/value projections, norms, embedding, LM head; biases are not scored)."""
    paths = weight_paths(anatomy)
    if hidden:
        owned = (s.path for s in anatomy.hidden_dimension().kind.owned if not s.is_bias)
        paths += [path for path in dict.fromkeys(owned) if path not in set(paths)]
    return paths


def owned_weights(model: nn.Module, kind: StructureKind) -> int:
    """The weights (not biases) one unit of a model-level ``kind`` owns: what its score sums over."""
    total = 0
    for tensor_slice in kind.owned:
        if not tensor_slice.is_bias:
            shape = weight_tensor(model, tensor_slice.path).shape
            total += tensor_slice.params_per_unit(shape)
    return total


def normalize_scores(
    model: nn.Module, anatomy: ModelAnatomy, raw: Scores, how: str, live: KeepMask, protected: list[int]
) -> Scores:
    """Block-wise normalisation ``how`` (see ``GispOptions.normalize``) of raw unit scores."""
    if how == "none":
        return dict(raw)
    out: Scores = {}
    if how == "block_mean":
        pools: dict[str, list[torch.Tensor]] = {}
        for (layer, name), values in raw.items():
            if layer not in protected:
                pools.setdefault(anatomy.kind(layer, name).block, []).append(values[live[layer, name]])
        means = {block: torch.cat(parts).mean() for block, parts in pools.items()}
        for (layer, name), values in raw.items():
            mean = means.get(anatomy.kind(layer, name).block, torch.tensor(0.0))
            out[layer, name] = values / mean if mean > 0 else values
        return out
    hidden = model.config.hidden_size
    for (layer, name), values in raw.items():
        kind = anatomy.kind(layer, name)
        if kind.block == HIDDEN_BLOCK:
            divisor = owned_weights(model, kind)  # reference and param_mean alike: the reference has no hidden kind
        elif how == "param_mean":
            divisor = kind.params_per_unit
        elif kind.block == "attention":
            divisor = 4 * kind.owned[0].width * hidden  # 4 * head_dim * hidden_size, as the reference
        elif kind.block in CHANNEL_BLOCKS:
            divisor = 3 * kind.owned[0].per_stack(kind.count)  # 3 * intermediate_size (per expert), as the reference
        else:
            raise ValueError(f"normalize='reference' knows attention and MLP blocks, not {kind.block!r}; use param_mean")
        out[layer, name] = values / divisor
    return out


def ranking_scores(
    anatomy: ModelAnatomy, normalized: Scores, live: KeepMask, protected: list[int], blocks: set[str] | None = None
) -> Scores:
    """What the global ranking sees: protected units (and blocks not in ``blocks``) ``+inf``, already
    pruned units ``-1`` (first out)."""
    out: Scores = {}
    for (layer, name), values in normalized.items():
        ranked = torch.where(live[layer, name], values, torch.full_like(values, -1.0))
        block = anatomy.kind(layer, name).block
        frozen = layer in protected or (blocks is not None and block != HIDDEN_BLOCK and block not in blocks)
        out[layer, name] = torch.full_like(values, torch.inf) if frozen else ranked
    return out


def ranking_groups(anatomy: ModelAnatomy, groupings: tuple[str, ...]) -> Groups:
    """The units that rank together: a routed expert's channels (``experts``), a key/value group (``kv``)."""
    groups: Groups = {}
    for layer in anatomy.layers:
        for name, kind in layer.kinds.items():
            if "experts" in groupings and kind.router_rows is not None:
                groups[layer.index, name] = kind.router_rows.readers
            elif "kv" in groupings and kind.block == "attention" and kind.dependents:
                groups[layer.index, name] = kind.dependents[0].readers
    return groups


def group_scores(ranked: Scores, groups: Groups) -> Scores:
    """One score per group: the sum of its units' ranking scores (all pruned: -1, first out)."""
    out = dict(ranked)
    for key, members in groups.items():
        values = ranked[key]
        out[key] = torch.stack(
            [values[list(m)].sum() if bool((values[list(m)] >= 0).any()) else values.new_tensor(-1.0) for m in members]
        )
    return out


def step_scores(
    model: nn.Module,
    anatomy: ModelAnatomy,
    calibration: CalibrationSet,
    options: GispOptions,
    pad_token_id: int = 0,
    progress: str | None = None,
) -> tuple[Scores, GradientSums]:
    """One GISP scoring pass on the model as it is (masked or not): raw unit scores and the gradient sums."""
    sums = accumulate_gradients(
        model,
        gradient_paths(anatomy, options.ranks_hidden),
        calibration,
        lookup("loss", options.loss),
        batch_size=options.batch_size,
        per_sample_squares=needs_squares(options.taylor),
        gradient_checkpointing=options.gradient_checkpointing,
        pad_token_id=pad_token_id,
        progress=progress,
    )
    return structure_scores(model, anatomy, sums, options.taylor, options.ranks_hidden), sums


def hidden_groups(ranked: torch.Tensor, divisor: int) -> tuple[tuple[int, ...], ...]:
    """Hidden channels in runs of ``divisor`` along their ranked order (lowest first; ties by index).
    Removed channels rank ``-1`` and their count is a multiple of ``divisor``: they fill the first groups."""
    order = torch.sort(ranked.double(), stable=True).indices.tolist()
    return tuple(tuple(order[i : i + divisor]) for i in range(0, len(order), divisor))


def hidden_group_scores(ranked: torch.Tensor, groups: tuple[tuple[int, ...], ...]) -> torch.Tensor:
    """One score per group of hidden channels: the mean of its channels' scores, so that a group competes as
    a channel does (the groups only round the width); removed groups ``-1``; the highest group ``+inf``
    (a model keeps some width)."""
    out = torch.stack([ranked[list(g)].mean() if bool((ranked[list(g)] >= 0).all()) else ranked.new_tensor(-1.0) for g in groups])
    out[-1] = torch.inf
    return out


def cut_exact(anatomy: ModelAnatomy, ranked: Scores, sparsity: float, groups: Groups) -> KeepMask:
    """The global ranking cut where the exact sparsity is closest to ``sparsity``.

    The allocator counts each unit's dense parameters, which overstates what a cut frees once hidden
    channels and heads or channels both go; its cut is monotone in the target it is given and the exact
    sparsity is monotone in the cut, so bisecting that target finds the cut.
    """

    def at(target: float) -> tuple[KeepMask, float] | None:
        try:
            keep = prune_lowest_globally(anatomy, ranked, target, groups)
        except UnreachableTargetError:
            return None
        return keep, anatomy.sparsity(keep)

    below = at(sparsity)  # the allocator's count is never below the exact one: this cut is at or below
    if below is None or below[1] >= sparsity:
        return prune_lowest_globally(anatomy, ranked, sparsity, groups) if below is None else below[0]
    # successive prefixes of the ranking differ by at least the smallest unit in the allocator's count, and it
    # cuts at the prefix closest to its target: a quarter of that unit as resolution reaches every prefix
    smallest = min(anatomy.kind(*key).params_per_unit for key in ranked) / anatomy.dense_params
    above, lo, hi = None, sparsity, 1.0
    while hi - lo > smallest / 4:
        mid = (lo + hi) / 2
        found = at(mid)
        if found is None or found[1] >= sparsity:
            hi, above = mid, found or above
        else:
            lo, below = mid, found
    if above is None or abs(below[1] - sparsity) <= abs(above[1] - sparsity):
        return below[0]
    return above[0]


def never_revived(cut: KeepMask, previous: KeepMask) -> KeepMask:
    """``cut`` without the units ``previous`` had pruned: the subnetworks stay nested.

    Already-pruned units rank first (``-1``), but the allocator stops at the prefix whose sparsity is closest
    to the target; when a step's target is less than half a unit above the last one (many steps on a small
    model), that prefix can end one entry short of everything already pruned and bring a unit back.
    """
    return KeepMask({key: flags & previous.flags[key] if key in previous.flags else flags for key, flags in cut.flags.items()})


def cut_to(anatomy: ModelAnatomy, ranked: Scores, sparsity: float, groups: Groups, options: GispOptions) -> KeepMask:
    """The keep mask at ``sparsity``: one global ranking, or one per pool (``rank=separate``); with hidden
    channels ranked, cut at the exact count (``cut_exact``)."""
    if HIDDEN_KEY in ranked:
        return cut_exact(anatomy, ranked, sparsity, groups)
    if options.rank == "separate":
        blocks = options.prunable_blocks
        return prune_lowest_per_pool(anatomy, ranked, sparsity, lambda block: ranking_pool(block, blocks), groups)
    return prune_lowest_globally(anatomy, ranked, sparsity, groups)


# --- resume state ----------------------------------------------------------------------------------------


def load_state(work_dir: Path | None, fingerprint: str, anatomy: ModelAnatomy) -> Trajectory | None:
    """The finished steps of an interrupted identical run, if ``work_dir`` holds them; else ``None``."""
    state = read_state(work_dir, STATE_FILE, STATE_FORMAT, fingerprint)
    if state is None:
        return None
    try:
        return Trajectory.from_json(state["trajectory"], anatomy)
    except (ValueError, KeyError) as err:
        log.warning("ignoring %s (%s); starting over", Path(work_dir) / STATE_FILE, err)
        return None


def replayed_cuts(done: Trajectory, schedule: Schedule, targets: tuple[float, ...]) -> list[Cut] | None:
    """The cuts the schedule makes given the recorded passes, if they are exactly the recorded ones
    (whole steps only); ``None`` when the state does not continue this schedule."""
    cuts: list[Cut] = []
    history: list[tuple[float, float]] = []
    start = 0.0
    for entry in done.steps:
        step = entry["gradient_step"]
        if step == len(history):  # the first cut of a new pass: its loss joins the history
            history.append((entry["gradient_at_sparsity"], entry["loss"]))
            if step >= schedule.steps:
                return None
            planned = step_cuts(step, start, schedule.end(step, start, history), targets)
            start = planned[-1].sparsity
            cuts += planned
    recorded = [Cut(e["gradient_step"], e["scheduled"], e["target"]) for e in done.steps]
    return cuts if recorded == cuts else None


def resumable_state(
    work_dir: Path | None, fingerprint: str, anatomy: ModelAnatomy, schedule: Schedule, targets: tuple[float, ...]
) -> Trajectory | None:
    """The finished steps of an interrupted identical run that this schedule continues, else ``None``."""
    done = load_state(work_dir, fingerprint, anatomy)
    if done is not None and done.steps and replayed_cuts(done, schedule, targets) is None:
        log.warning("ignoring %s: it does not continue this schedule; starting over", Path(work_dir) / STATE_FILE)
        return None
    return done


# --- the method ------------------------------------------------------------------------------------------


def run(job: PruningJob) -> Iterator[Subnetwork]:
    """Prune iteratively to every target in ``job.targets``, yielding each subnetwork as it is reached."""
    options: GispOptions = job.options
    if job.calibration is None:
        raise ValueError("gisp needs calibration data")
    anatomy = job.anatomy
    protected = protected_layers(len(anatomy.layers), options.protect)
    groups = ranking_groups(anatomy, options.groupings)
    schedule = options.schedule_for(max(job.targets))
    fingerprint = job_fingerprint(job)
    pad_token_id = getattr(job.tokenizer, "pad_token_id", None) or 0
    divisor = hidden_divisor(anatomy, options) if options.ranks_hidden else 0

    keep = KeepMask.dense(anatomy, hidden=options.ranks_hidden)
    history: list[tuple[float, float]] = []  # (sparsity, calibration loss) of every gradient pass so far
    start = 0.0  # where the next pass starts cutting: the previous pass's end
    done = from_main(lambda: resumable_state(job.work_dir, fingerprint, anatomy, schedule, job.targets))  # rank 0 reads
    for index, entry in enumerate(done.steps if done is not None else []):  # replay: same decisions, no gradients
        info = {k: v for k, v in entry.items() if k not in ("step", "sparsity")}
        keep = done.keep_at(index)
        job.trajectory.record(keep, entry["sparsity"], **info)
        if entry["gradient_step"] == len(history):
            history.append((entry["gradient_at_sparsity"], entry["loss"]))
        start = entry["scheduled"]
        if entry["target"] is not None:
            job.masked.apply(keep)
            yield job.subnetwork(entry["target"], keep, info=_subnetwork_info(info, options), elapsed_s=info.get("elapsed_s"))
    if history:
        log.info("gisp: resuming from %s after %d of %d steps", job.work_dir, len(history), options.steps)

    bar = tqdm(total=options.steps, initial=len(history), desc="GISP", unit="step", disable=not is_main_process())
    try:
        for step in range(len(history), options.steps):
            started = time.perf_counter()
            before = job.trajectory.steps[-1].get("elapsed_s", 0.0) if job.trajectory.steps else 0.0  # earlier runs too
            job.masked.apply(keep)
            torch.manual_seed(job.seed + step)
            sparsity = anatomy.sparsity(keep)
            try:
                desc = f"GISP step {step + 1}/{options.steps}"
                raw, sums = step_scores(job.model, anatomy, job.calibration, options, pad_token_id, desc)
            except NonFiniteError as err:
                raise NonFiniteError(f"gisp step {step + 1}/{options.steps} at sparsity {sparsity:.4f}: {err}") from err
            history.append((sparsity, sums.loss))
            normalized = normalize_scores(job.model, anatomy, raw, options.normalize, keep, protected)
            ranked = group_scores(ranking_scores(anatomy, normalized, keep, protected, options.prunable_blocks), groups)
            step_groups = groups
            if options.ranks_hidden:
                step_groups = {**groups, HIDDEN_KEY: hidden_groups(ranked[HIDDEN_KEY], divisor)}
                ranked[HIDDEN_KEY] = hidden_group_scores(ranked[HIDDEN_KEY], step_groups[HIDDEN_KEY])
            reached = []
            cuts = step_cuts(step, start, schedule.end(step, start, history), job.targets)
            for cut in cuts:
                keep = never_revived(cut_to(anatomy, ranked, cut.sparsity, step_groups, options), keep)
                info = {
                    "target": cut.target,
                    "scheduled": cut.sparsity,
                    "gradient_step": step,
                    "gradient_at_sparsity": sparsity,
                    "loss": sums.loss,
                    "step_time_s": time.perf_counter() - started,
                }
                info["elapsed_s"] = before + info["step_time_s"]
                job.trajectory.record(keep, anatomy.sparsity(keep), **info)
                if cut.target is not None:
                    reached.append((cut.target, keep, info))
            start = cuts[-1].sparsity
            if is_main_process():
                write_state(job.work_dir, STATE_FILE, STATE_FORMAT, fingerprint, {"trajectory": job.trajectory.to_json()})
            bar.set_postfix(sparsity=f"{anatomy.sparsity(keep):.4f}", loss=f"{sums.loss:.4f}")
            bar.update(1)
            log.debug("gisp step %d/%d: loss %.4f at sparsity %.4f", step + 1, options.steps, sums.loss, sparsity)
            for target, reached_keep, info in reached:
                job.masked.apply(reached_keep)
                yield job.subnetwork(target, reached_keep, info=_subnetwork_info(info, options), elapsed_s=info["elapsed_s"])
    finally:
        bar.close()


def _subnetwork_info(info: dict, options: GispOptions) -> dict:
    return {"steps": options.steps, "gradient_step": info["gradient_step"], "calibration_loss": info["loss"]}


GISP = MethodSpec(
    name="gisp",
    description="Global iterative structured pruning: |W*g| Taylor scores, block-normalised, one global ranking, "
    "gradients recomputed on the masked model at every step (nested subnetworks)",
    run=run,
    options=GispOptions,
    calibration=CalibrationDefaults("c4", 2000, 256),
    nested=True,
    shardable=True,
    sharded_refusal=sharding_refusal,
    max_sparsity=max_sparsity,
    check_options=check_options,
)


@hookimpl
def gisp_methods() -> list[MethodSpec]:
    return [GISP]
