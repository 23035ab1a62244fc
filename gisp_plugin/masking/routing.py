"""Routing around pruned experts: a masked router never picks an expert that lost every channel.

Zeroing a router's weight row leaves that expert a logit of 0, which the top-k may still pick; the
compacted model has no such expert at all. A forward hook on the router sets the logits of dead
experts to ``-inf`` and takes the top-k again, with the family's own rule for renormalising the
kept weights (``norm_topk_prob``; Mixtral's router has no such flag and always renormalises). The
masked model then routes exactly as the compacted one does.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from gisp_plugin.anatomy.structures import KeepMask, ModelAnatomy


def reroute(router: nn.Module, output: tuple, dead: torch.Tensor) -> tuple:
    """The router's ``(logits, weights, indices)`` with ``dead`` experts (bool ``[E]``) out of reach."""
    logits, weights, indices = output
    logits = logits.masked_fill(dead.to(logits.device), float("-inf"))
    probs = torch.nan_to_num(torch.softmax(logits, dim=-1, dtype=torch.float), nan=0.0)  # no expert left: all 0
    top, chosen = torch.topk(probs, indices.shape[-1], dim=-1)
    if getattr(router, "norm_topk_prob", True):
        total = top.sum(dim=-1, keepdim=True)
        top = torch.where(total > 0, top / total.clamp_min(torch.finfo(top.dtype).tiny), top)
    return logits, top.to(weights.dtype), chosen


class RoutingMask:
    """Forward hooks that keep every masked router away from its dead experts."""

    def __init__(self, model: nn.Module, anatomy: ModelAnatomy):
        self.model = model
        self.anatomy = anatomy
        self._handles: list[RemovableHandle] = []

    def apply(self, keep: KeepMask) -> None:
        self.remove()
        for layer in self.anatomy.layers:
            for name, kind in layer.kinds.items():
                rows = kind.router_rows
                if rows is None:
                    continue
                dead = ~rows.alive(keep[layer.index, name])
                if bool(dead.any()):
                    router = self.model.get_submodule(f"{layer.prefix}.{kind.router}")
                    self._handles.append(router.register_forward_hook(_hook(dead)))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _hook(dead: torch.Tensor):
    def hook(module: nn.Module, inputs, output):
        return reroute(module, output, dead)

    return hook
