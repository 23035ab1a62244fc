"""A dense model that temporarily computes a subnetwork: keep masks plus extra output biases and updated weights.

Methods work on this view: they apply a ``KeepMask`` (and, like FLAP, biases added to output
projections; like SlimGPT, new values of kept weights), measure the model, and move on; ``release``
gives the dense model back untouched.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from gisp_plugin.anatomy.structures import KeepMask, ModelAnatomy
from gisp_plugin.masking.routing import RoutingMask
from gisp_plugin.masking.sparsifier import StructureSparsifier
from gisp_plugin.masking.updated_weights import WeightSwap


class MaskedModel:
    """Keep masks, extra biases and updated weights on a live model, removable without a trace."""

    def __init__(self, model: nn.Module, anatomy: ModelAnatomy):
        self.model = model
        self.anatomy = anatomy
        self.sparsifier = StructureSparsifier(anatomy)
        self.sparsifier.prepare(model)
        self.routing = RoutingMask(model, anatomy)
        self.extra_biases: dict[str, torch.Tensor] = {}
        self._bias_hooks: list[RemovableHandle] = []
        self.weights = WeightSwap(model)

    @property
    def keep(self) -> KeepMask:
        return self.sparsifier.keep

    def apply(
        self,
        keep: KeepMask,
        extra_biases: dict[str, torch.Tensor] | None = None,
        updated_weights: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Compute the subnetwork ``keep``; ``extra_biases`` maps module paths to added output biases,
        ``updated_weights`` tensor paths to new dense values of kept weights (see ``updated_weights``)."""
        check_no_bias_in_removed_layers(self.anatomy, keep, extra_biases or {})
        if keep.hidden_pruned() and extra_biases:
            raise ValueError("extra output biases with removed hidden channels are not supported; prune one or the other")
        if keep.hidden_pruned() and not self.sparsifier.hidden:  # hidden masks reach the model only when used
            self.sparsifier.restore_dense()
            self.sparsifier = StructureSparsifier(self.anatomy, hidden=True)
            self.sparsifier.prepare(self.model)
        self.weights.write(updated_weights or {})
        self.sparsifier.apply(keep)
        self.routing.apply(keep)
        self.set_extra_biases(extra_biases or {})

    def set_extra_biases(self, extra_biases: dict[str, torch.Tensor]) -> None:
        for handle in self._bias_hooks:
            handle.remove()
        self._bias_hooks = []
        self.extra_biases = {path: bias.detach() for path, bias in extra_biases.items()}
        for path, bias in self.extra_biases.items():
            module = self.model.get_submodule(path)
            self._bias_hooks.append(module.register_forward_hook(_add_bias(bias)))

    def sparsity(self, keep: KeepMask | None = None) -> float:
        return self.anatomy.sparsity(self.keep if keep is None else keep)

    def release(self) -> nn.Module:
        """Remove masks, biases and updated weights; the model is dense again."""
        self.set_extra_biases({})
        self.weights.restore()
        self.routing.remove()
        self.sparsifier.restore_dense()
        return self.model

    def __enter__(self) -> MaskedModel:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def check_no_bias_in_removed_layers(anatomy: ModelAnatomy, keep: KeepMask, extra_biases: dict[str, torch.Tensor]) -> None:
    """A removed layer is the identity: an added output bias there would make it something else."""
    for index in keep.removed_layers():
        prefix = f"{anatomy.layers[index].prefix}."
        named = sorted(path for path in extra_biases if path.startswith(prefix))
        if named:
            raise ValueError(f"an extra bias names {named[0]}, inside a removed layer; a removed layer adds nothing")


def _add_bias(bias: torch.Tensor):
    def hook(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        return output + bias.to(device=output.device, dtype=output.dtype)

    return hook
