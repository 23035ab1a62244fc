"""Keep masks on a live model, as ``torch.ao.pruning`` parametrizations.

``StructureSparsifier`` is a ``BaseSparsifier``: ``prepare`` attaches one structured parametrization
per weight and bias a structure touches, ``step`` rewrites the masks from the current ``KeepMask``,
and ``squash_mask`` (or ``restore_dense``) removes them. Rows use torch's ``FakeStructuredSparsity``;
columns use a sibling that masks along dim 1. Biases get their own parametrization instead of torch's
``BiasHook``, which reshapes biases in the convolution layout and corrupts a biased ``Linear`` on 3-D input.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.ao.pruning import BaseSparsifier
from torch.ao.pruning._experimental.pruner import FakeStructuredSparsity
from torch.nn.utils import parametrize

from gisp_plugin.anatomy.structures import KeepMask, ModelAnatomy


class ColumnStructuredSparsity(FakeStructuredSparsity):
    """Like ``FakeStructuredSparsity``, but the mask selects columns (input features) of a weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mask.shape[0] != x.shape[1]:
            raise ValueError(f"column mask of size {self.mask.shape[0]} does not fit a weight of shape {tuple(x.shape)}")
        return self.mask.reshape(1, -1) * x


PARAMETRIZATION_BY_AXIS = {0: FakeStructuredSparsity, 1: ColumnStructuredSparsity}


def dense_tensor(module: nn.Module, name: str) -> torch.Tensor | None:
    """The unmasked tensor behind ``module.<name>``, whether or not a mask is attached."""
    if parametrize.is_parametrized(module, name):
        return getattr(module.parametrizations, name).original
    return getattr(module, name, None)


class StructureSparsifier(BaseSparsifier):
    """Masks every tensor slice of every structure kind according to a ``KeepMask``."""

    def __init__(self, anatomy: ModelAnatomy):
        super().__init__(defaults={})
        self.anatomy = anatomy
        self.keep = KeepMask.dense(anatomy)

    def sparsity_config(self, model: nn.Module) -> list[dict]:
        """One config entry per masked tensor, recording which unit flags drive its mask."""
        config = []
        for layer in self.anatomy.layers:
            for kind_name, kind in layer.kinds.items():
                slices = [(s, None) for s in kind.owned] + [(d.slice, d) for d in kind.dependents]
                for tensor_slice, dependent in slices:
                    config.append(
                        {
                            "tensor_fqn": f"{layer.prefix}.{tensor_slice.path}",
                            "layer": layer.index,
                            "kind": kind_name,
                            "axis": tensor_slice.axis,
                            "width": tensor_slice.width,
                            "dependent": dependent,
                        }
                    )
        return config

    def prepare(self, model: nn.Module, config: list[dict] | None = None) -> None:
        super().prepare(model, config if config is not None else self.sparsity_config(model))

    def _prepare(self, *args, **kwargs) -> None:
        for group in self.groups:
            module, name = group["module"], group["tensor_name"]
            tensor = getattr(module, name)
            mask = torch.ones(tensor.shape[group["axis"]], dtype=torch.bool, device=tensor.device)
            self.state[group["tensor_fqn"]]["mask"] = mask
            parametrize.register_parametrization(module, name, PARAMETRIZATION_BY_AXIS[group["axis"]](mask))

    def update_mask(self, module: nn.Module, tensor_name: str, **group) -> None:
        flags = self.keep[group["layer"], group["kind"]]
        dependent = group["dependent"]
        if dependent is not None:
            flags = dependent.alive(flags)
        mask = getattr(module.parametrizations, tensor_name)[0].mask
        mask.copy_(flags.repeat_interleave(group["width"]).to(mask.device))

    def apply(self, keep: KeepMask) -> None:
        """Make the model compute exactly the subnetwork ``keep`` describes."""
        self.keep = keep.copy()
        self.step()

    def restore_dense(self) -> None:
        """Remove every mask and give the model back its dense, unmasked weights."""
        for group in self.groups:
            parametrize.remove_parametrizations(group["module"], group["tensor_name"], leave_parametrized=False)
        self.groups = []
