"""Routing around pruned experts: a masked router routes as the compacted one, over the live experts only.

Zeroing a router's weight row leaves that expert a logit of 0, which the top-k may still pick; the
compacted model has no such expert at all. A forward hook on the router runs the family's own router
again with only the live experts' tensors (its weight rows and every other per-expert tensor, such as
GLM-4.5's score-correction bias) and its expert count and top-k set to theirs, then numbers the chosen
experts back in the dense order. Whatever rule the family routes by (softmax, sigmoid with a bias, Phi-MoE's
sparse mixer), the masked model then routes exactly as the compacted one does. A router without a live
expert picks none.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

from gisp_plugin.anatomy.structures import KeepMask, ModelAnatomy, StructureKind
from gisp_plugin.masking.sparsifier import dense_tensor


def router_attributes(router: nn.Module, live: int) -> dict[str, int]:
    """The router's expert count and top-k (those of the two it has) for ``live`` remaining experts."""
    attributes = {"num_experts": live, "top_k": min(getattr(router, "top_k", live), live)}
    return {name: value for name, value in attributes.items() if hasattr(router, name)}


def no_expert_routing(hidden_states: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logits, weights, indices)`` of a router left without a live expert: every logit ``-inf``, nothing picked
    (the compacted router's ``no_experts``)."""
    tokens = hidden_states.reshape(-1, hidden_states.shape[-1]).shape[0]
    logits = hidden_states.new_full((tokens, experts), float("-inf"), dtype=torch.float32)
    picked = hidden_states.new_zeros((tokens, 0))
    return logits, picked, picked.long()


class _LiveRouter:
    """Runs one masked router over its live experts and maps its choices back to the dense numbering."""

    def __init__(self, layer: nn.Module, kind: StructureKind, alive: torch.Tensor):
        self.router = layer.get_submodule(kind.router)
        self.live = alive.nonzero().flatten()
        self.experts = alive.numel()
        self.inside: dict[str, int] = {}  # per-expert tensors of the router: axis by path inside it
        self.passed: dict[tuple[int, ...], int] = {}  # those of the block around it, passed in as arguments: axis by shape
        for dep in kind.router_tensors:
            path, axis = dep.slice.path, dep.slice.axis
            if path.startswith(f"{kind.router}."):
                self.inside[path.removeprefix(f"{kind.router}.")] = axis
            else:
                self.passed[tuple(dense_tensor(layer.get_submodule(dep.slice.module_path), dep.slice.tensor_name).shape)] = axis

    def _cut(self, tensor: torch.Tensor, axis: int) -> torch.Tensor:
        return tensor.index_select(axis, self.live.to(tensor.device))

    def _live_module(self, module: nn.Module, prefix: str = "") -> nn.Module:
        """A stand-in for ``module`` (the router or a module inside it) holding only the live experts' entries of
        its per-expert tensors: the tensors as the forward sees them (masked, cached, updated), cut, so gradients
        still reach the router; its other tensors and children shared; no parametrizations, no hooks."""
        # a masked module's class is a subclass torch made to hold the parametrizations (and refuses copying)
        cls = type(module).__bases__[0] if parametrize.is_parametrized(module) else type(module)
        live = object.__new__(cls)
        live.__dict__.update(module.__dict__)
        live._parameters, live._buffers = dict(module._parameters), dict(module._buffers)
        live._forward_hooks, live._forward_pre_hooks = OrderedDict(), OrderedDict()
        live._modules = {name: child for name, child in module._modules.items() if name != "parametrizations"}
        for name in module._modules:
            if name != "parametrizations" and any(path.startswith(f"{prefix}{name}.") for path in self.inside):
                live._modules[name] = self._live_module(module._modules[name], f"{prefix}{name}.")
        for path, axis in self.inside.items():
            name = path.removeprefix(prefix)
            if path.startswith(prefix) and "." not in name:
                tensor = self._cut(getattr(module, name), axis)
                (live._buffers if name in module._buffers else live._parameters)[name] = tensor
        return live

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: tuple) -> tuple:
        if not self.live.numel():
            return no_expert_routing(args[0] if args else next(iter(kwargs.values())), self.experts)
        args = tuple(
            self._cut(arg, self.passed[tuple(arg.shape)])
            if isinstance(arg, torch.Tensor) and tuple(arg.shape) in self.passed
            else arg
            for arg in args
        )
        live = self._live_module(module)
        live.__dict__.update(router_attributes(module, int(self.live.numel())))
        # the stand-in's forward, not the router's call: no hook (this one, or a method's) sees the live-only output
        live_logits, weights, chosen = live.forward(*args, **kwargs)
        logits = live_logits.new_full((*live_logits.shape[:-1], self.experts), float("-inf"))
        logits[..., self.live.to(logits.device)] = live_logits
        return logits, weights, self.live.to(chosen.device)[chosen]


class RoutingMask:
    """Forward hooks that keep every masked router to its live experts."""

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
                alive = rows.alive(keep[layer.index, name])
                if not bool(alive.all()):
                    hook = _LiveRouter(self.model.get_submodule(layer.prefix), kind, alive)
                    self._handles.append(hook.router.register_forward_hook(hook, with_kwargs=True))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
