"""What both gradient engines (``gradients`` on one model, ``sharded_gradients`` on an FSDP2-sharded one)
share: the objective they differentiate, the float32 sums they return, which weights they read, and the
contexts a backward pass runs in. A module of its own, so neither engine imports the other's internals.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_layers import GradientCheckpointingLayer

from gisp_plugin.anatomy.structures import ModelAnatomy
from gisp_plugin.data.api import CalibrationBatch, CalibrationSet
from gisp_plugin.masking.sparsifier import dense_tensor


class Objective(Protocol):
    """What a loss plugin gives the gradient engine (see ``gisp_plugin.importance.losses.Loss``)."""

    name: str

    def per_sample(self, logits: torch.Tensor, batch: CalibrationBatch) -> torch.Tensor:
        """Per-sample losses ``[batch]`` (float32) from logits ``[batch, seq, vocab]``."""

    def sample_weights(self, calibration: CalibrationSet) -> torch.Tensor:
        """Weights ``[n]`` (float64) over the whole set: the objective is ``sum_i w_i * loss_i``."""


@dataclass
class GradientSums:
    """Float32 sums over calibration samples, for each requested weight (by full tensor path).

    ``grad[path] = sum_i w_i * dloss_i/dW``: with the loss's own weights, the full-set gradient.
    ``grad_sq[path] = sum_i |w_i| * (dloss_i/dW) ** 2`` when per-sample squares were asked for
    (for ``ntp``, ``w_i = 1/N``: LLM-Pruner's ``acc``). ``loss = sum_i w_i * loss_i`` (the objective's
    value; the mean loss for ``ntp``), ``n_samples`` the samples with a non-zero weight. All fields are
    sums, so partial results over disjoint samples add up.
    """

    grad: dict[str, torch.Tensor]
    grad_sq: dict[str, torch.Tensor] | None = None
    n_samples: int = 0
    loss: float = 0.0
    n_tokens: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    def merge(self, other: GradientSums) -> GradientSums:
        """Add the sums of ``other`` (disjoint samples) into this one, in place; returns self."""
        for path, value in other.grad.items():
            self.grad[path].add_(value.to(self.grad[path].device))
        if self.grad_sq is not None and other.grad_sq is not None:
            for path, value in other.grad_sq.items():
                self.grad_sq[path].add_(value.to(self.grad_sq[path].device))
        self.n_samples += other.n_samples
        self.loss += other.loss
        self.n_tokens += other.n_tokens
        return self

    def all_reduce(self, group: Any = None) -> GradientSums:
        """Sum every field across the ranks of a ``torch.distributed`` group (data-parallel calibration)."""
        import torch.distributed as dist

        tensors = list(self.grad.values()) + list((self.grad_sq or {}).values())
        for tensor in tensors:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        device = tensors[0].device if tensors else torch.device("cpu")
        scalars = torch.tensor([self.n_samples, self.loss, self.n_tokens], dtype=torch.float64, device=device)
        dist.all_reduce(scalars, op=dist.ReduceOp.SUM, group=group)
        self.n_samples, self.loss, self.n_tokens = int(scalars[0]), float(scalars[1]), int(scalars[2])
        return self


def weight_paths(anatomy: ModelAnatomy, include_dependents: bool = False) -> list[str]:
    """Full paths of the weight matrices (not biases) that structures own, in layer order.

    With ``include_dependents`` the shared key/value weights of grouped-query attention are included
    too (needed when a unit is a whole key/value group, as in LLM-Pruner's Llama-3 setting).
    """
    paths: list[str] = []
    for layer in anatomy.layers:
        for kind in layer.kinds.values():
            slices = list(kind.owned) + ([d.slice for d in kind.dependents] if include_dependents else [])
            for tensor_slice in slices:
                path = f"{layer.prefix}.{tensor_slice.path}"
                if not tensor_slice.is_bias and path not in paths:
                    paths.append(path)
    return paths


def weight_tensor(model: nn.Module, path: str) -> torch.Tensor:
    """The dense leaf tensor at ``path`` (under a mask: the unmasked original the gradient flows into)."""
    module_path, _, name = path.rpartition(".")
    tensor = dense_tensor(model.get_submodule(module_path), name)
    if tensor is None:
        raise KeyError(f"model has no tensor {path!r}")
    return tensor


@contextlib.contextmanager
def only_these_require_grad(model: nn.Module, leaves: list[torch.Tensor]) -> Iterator[None]:
    """Freeze every parameter except ``leaves`` (restoring each flag afterwards)."""
    before = {id(p): (p, p.requires_grad) for p in model.parameters()}
    wanted = {id(t) for t in leaves}
    try:
        for param, _ in before.values():
            param.requires_grad_(id(param) in wanted)
        yield
    finally:
        for param, flag in before.values():
            param.requires_grad_(flag)


@contextlib.contextmanager
def activation_checkpointing(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Recompute each decoder layer in backward instead of storing its activations (non-reentrant).

    Uses the ``GradientCheckpointingLayer`` machinery of transformers, but flips only the layers' own
    ``training`` flag, so dropout and every other submodule stay in eval mode and the gradients are the
    same as without checkpointing.
    """
    if not enabled:
        yield
        return
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no decoder layers that support gradient checkpointing")
    saved = [(m, m.gradient_checkpointing, getattr(m, "_gradient_checkpointing_func", None), m.training) for m in layers]
    try:
        for layer in layers:
            layer.gradient_checkpointing = True
            layer._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)
            layer.training = True  # transformers checkpoints only in training mode; children stay in eval
        yield
    finally:
        for layer, flag, func, training in saved:
            layer.gradient_checkpointing = flag
            if func is None:
                del layer._gradient_checkpointing_func
            else:
                layer._gradient_checkpointing_func = func
            layer.training = training
