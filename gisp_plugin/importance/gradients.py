"""Gradients of a calibration objective with respect to chosen weights, summed in float32 over batches.

Gradient-based criteria (GISP's ``|W * g|``, LLM-Pruner's Taylor scores) all need the same thing: the
gradient of a loss averaged over the whole calibration set, for the weights that structures own, and
sometimes the per-sample squared gradients. This module computes exactly that, once, for everyone.

The objective is a weighted sum of per-sample losses, ``sum_i w_i * loss_i``; the weights come from the
loss (``ntp``: ``w_i = 1 / N``, so the sum is the mean gradient ``g = grad / n_samples`` of the GISP
reference; ``margin``: ``+1 / n_pos`` and ``-1 / n_neg``). Because it is a plain sum over samples, it is
additive over batches, micro-batches and ranks: ``GradientSums.merge`` (or ``all_reduce`` under
``torch.distributed``) of partial sums gives the full-set result, whatever the split. Under ``torchrun``
(data parallel) ``accumulate_gradients`` does exactly that by itself: each rank sums its contiguous share of
the set with the weights of the whole set, and the ranks' sums are all-reduced, so every rank returns the
full-set sums and every method is data parallel without knowing it.

Cost: only the requested weights require gradients (embeddings, ``lm_head``, norms stay frozen); each
weight's gradient is folded into a float32 buffer by a post-accumulate hook right after backward produces
it and then dropped, so a bf16 model never accumulates in bf16 and never holds a full set of gradients.
A masked weight is computed once per pass and reused by every micro-batch, so a masked model costs what
a dense one does. Optional activation checkpointing trades compute for memory. A non-finite loss or
gradient raises ``NonFiniteError`` instead of producing silent NaN scores.

Usage (LLM-Pruner's second-order Taylor needs ``acc = sum_i g_i ** 2 / N``)::

    paths = weight_paths(anatomy)
    sums = accumulate_gradients(model, paths, calibration, lookup("loss", "ntp"), per_sample_squares=True)
    g = sums.grad[path]        # mean gradient over the calibration set, float32, shape of the weight
    acc = sums.grad_sq[path]   # sum_i g_i ** 2 / N, float32
    w = weight_tensor(model, path)  # the dense (unmasked) weight the gradient belongs to
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from gisp_plugin.data.api import CalibrationSet
from gisp_plugin.distributed.context import current_setup
from gisp_plugin.distributed.data_parallel import rank_share
from gisp_plugin.finite import NonFiniteError
from gisp_plugin.importance.gradient_sums import GradientSums as GradientSums
from gisp_plugin.importance.gradient_sums import Objective as Objective
from gisp_plugin.importance.gradient_sums import activation_checkpointing as activation_checkpointing
from gisp_plugin.importance.gradient_sums import only_these_require_grad as only_these_require_grad
from gisp_plugin.importance.gradient_sums import weight_paths as weight_paths
from gisp_plugin.importance.gradient_sums import weight_tensor as weight_tensor
from gisp_plugin.importance.sharded_gradients import accumulate_sharded_gradients

log = logging.getLogger(__name__)


class _Accumulator:
    """Post-accumulate-grad hooks that fold each fresh gradient into float32 sums and free it."""

    def __init__(self, leaves: dict[str, torch.Tensor], squares: bool):
        self.grad = {path: torch.zeros(t.shape, dtype=torch.float32, device=t.device) for path, t in leaves.items()}
        self.grad_sq = (
            {path: torch.zeros(t.shape, dtype=torch.float32, device=t.device) for path, t in leaves.items()} if squares else None
        )
        self.scale = 1.0  # per-sample mode: the sample's weight w_i (backward ran on the unweighted loss)
        self.squares = squares
        self.handles = [t.register_post_accumulate_grad_hook(self._hook(path)) for path, t in leaves.items()]

    def _hook(self, path: str) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            g = param.grad.float()
            self.grad[path].add_(g, alpha=self.scale)
            if self.grad_sq is not None:
                self.grad_sq[path].addcmul_(g, g, value=abs(self.scale))
            param.grad = None

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def accumulate_gradients(
    model: nn.Module,
    paths: list[str],
    calibration: CalibrationSet,
    objective: Objective,
    *,
    batch_size: int = 2,
    per_sample_squares: bool = False,
    gradient_checkpointing: bool = False,
    sample_weights: torch.Tensor | None = None,
    pad_token_id: int = 0,
    progress: str | None = None,
) -> GradientSums:
    """Sum the weighted gradients of ``objective`` over ``calibration`` for the weights at ``paths``.

    ``batch_size`` sequences go through each forward/backward (a micro-batch: the result does not depend
    on it, up to float rounding). ``per_sample_squares`` forces one sequence per backward and also sums
    the squared per-sample gradients. ``sample_weights`` ``[len(calibration)]`` overrides the objective's
    weights. ``progress`` is a tqdm description (``None``: no bar; else a bar on rank 0 when stderr is a
    terminal).

    Data parallel (an initialised ``torch.distributed`` group): each rank sums its share of
    ``calibration`` (``rank_share``) with its slice of the whole set's weights, then the sums are
    all-reduced: every rank returns the full-set sums, equal to one process's up to float rounding.

    Masked weights (``torch.ao.pruning`` parametrizations) stay masked. Each masked weight is computed
    once per call and used as the leaf for every batch (``parametrize.cached``), so micro-batches cost
    what they cost on an unmasked model; the chain rule through the mask is applied once at the end.
    The result is the gradient with respect to the dense original, ``mask * g``: masked units get
    exactly zero.

    A model sharded with FSDP2 (``gisp_plugin.distributed.fsdp.shard_model``) takes its own path: each
    rank runs its share of the data and the sums come back sharded like the weights (``sharded_gradients``).
    """
    from gisp_plugin.distributed.fsdp import is_sharded

    weights = objective.sample_weights(calibration) if sample_weights is None else sample_weights
    weights = weights.to(torch.float64).cpu()
    if weights.shape != (len(calibration),):
        raise ValueError(f"sample weights need shape ({len(calibration)},), got {tuple(weights.shape)}")
    if is_sharded(model):
        return accumulate_sharded_gradients(
            model,
            paths,
            calibration,
            objective,
            batch_size=batch_size,
            per_sample_squares=per_sample_squares,
            gradient_checkpointing=gradient_checkpointing,
            sample_weights=weights,
            pad_token_id=pad_token_id,
            progress=progress,
        )
    setup = current_setup()
    calibration, weights = rank_share(calibration, weights, setup)
    if per_sample_squares:
        batch_size = 1
    params = {path: weight_tensor(model, path) for path in paths}
    device = next(iter(params.values())).device if params else next(model.parameters()).device

    loss_sum = 0.0
    n_tokens = 0
    batches = calibration.batches(batch_size, pad_token_id)
    bar = tqdm(
        batches,
        total=math.ceil(len(calibration) / batch_size),
        desc=progress,
        leave=False,
        disable=True if progress is None or not setup.is_main else None,
    )
    with only_these_require_grad(model, list(params.values())), parametrize.cached():
        leaves = {path: _leaf(model, path, params[path]) for path in paths}
        accumulator = _Accumulator(leaves, per_sample_squares)
        try:
            with activation_checkpointing(model, gradient_checkpointing), torch.enable_grad():
                for index, batch in enumerate(bar):
                    start = index * batch_size
                    w = weights[start : start + len(batch)]
                    if not bool((w != 0).any()):
                        continue
                    batch = batch.to(device)
                    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
                    losses = objective.per_sample(logits, batch)  # [batch]
                    if per_sample_squares:
                        accumulator.scale = float(w[0])
                        total = losses.sum()
                    else:
                        total = (losses * w.to(device=losses.device, dtype=losses.dtype)).sum()
                    value = float((losses.detach().double().cpu() * w).sum())
                    if not math.isfinite(value) or not bool(torch.isfinite(losses.detach()).all()):
                        raise NonFiniteError(
                            f"calibration loss is not finite ({value}) at samples {start}..{start + len(batch) - 1} "
                            f"of {calibration.name!r}; check the model dtype (float16 overflows easily) and the data"
                        )
                    total.backward()
                    loss_sum += value
                    n_tokens += int(batch.attention_mask.sum())
                    if progress is not None:
                        bar.set_postfix(loss=f"{loss_sum:.4g}")
        finally:
            accumulator.remove()
            bar.close()
            for leaf in leaves.values():
                leaf.grad = None

    for path in paths:
        if leaves[path] is not params[path]:  # chain rule through the mask, once
            factor = _mask_derivative(model, path, params[path]).float()
            accumulator.grad[path].mul_(factor)
            if accumulator.grad_sq is not None:
                accumulator.grad_sq[path].mul_(factor * factor)
    for name, sums in (("gradient", accumulator.grad), ("squared gradient", accumulator.grad_sq or {})):
        for path, tensor in sums.items():
            if not bool(torch.isfinite(tensor).all()):
                raise NonFiniteError(f"{name} of {path} is not finite after calibration on {calibration.name!r}")
    sums = GradientSums(
        grad=accumulator.grad,
        grad_sq=accumulator.grad_sq,
        n_samples=int((weights != 0).sum()),
        loss=loss_sum,
        n_tokens=n_tokens,
        info={"objective": objective.name, "batch_size": batch_size},
    )
    return sums.all_reduce() if setup.enabled else sums


def _leaf(model: nn.Module, path: str, param: torch.Tensor) -> torch.Tensor:
    """The tensor gradients accumulate on: the parameter itself, or the cached masked weight."""
    module_path, _, name = path.rpartition(".")
    module = model.get_submodule(module_path)
    if not parametrize.is_parametrized(module, name):
        return param
    with torch.no_grad():
        effective = getattr(module, name)  # computed once and cached for the whole pass
    return effective.requires_grad_(True)


def _mask_derivative(model: nn.Module, path: str, original: torch.Tensor) -> torch.Tensor:
    """d(masked weight)/d(original) for an element-wise mask: the vector-Jacobian product with ones."""
    module_path, _, name = path.rpartition(".")
    flag = original.requires_grad
    try:
        with torch.enable_grad():
            original.requires_grad_(True)
            masked = getattr(model.get_submodule(module_path), name)
            (derivative,) = torch.autograd.grad(masked, original, torch.ones_like(masked))
    finally:
        original.requires_grad_(flag)
    return derivative
