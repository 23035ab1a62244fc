"""Keep masks on a live model, as ``torch.ao.pruning`` parametrizations.

``StructureSparsifier`` is a ``BaseSparsifier``: ``prepare`` attaches one structured parametrization
per weight and bias a structure touches, ``step`` rewrites the masks from the current ``KeepMask``,
and ``squash_mask`` (or ``restore_dense``) removes them. Each mask is a subclass of torch's
``FakeStructuredSparsity`` whose mask broadcasts over the tensor, so rows, columns and fused tensors cut
by several structures share one mechanism. Biases get their own parametrization instead of torch's
``BiasHook``, which reshapes biases in the convolution layout and corrupts a biased ``Linear`` on 3-D input.
A removed layer (kind ``"layer"``) zeroes its whole output projections, so it adds nothing to the residual.
Hidden channels (``anatomy.hidden``) are masked only by a sparsifier made with ``hidden=True``: their masks
reach the embedding, the norms and every projection, and other methods' models stay as they were.

A model sharded with FSDP2 must carry its masks before ``fully_shard`` (FSDP then shards the masked
tensor's ``original`` and all-gathers it for the forward; a parametrization registered afterwards would
see the sharded tensor). ``gisp_plugin.distributed.fsdp.shard_model`` therefore registers all-ones masks
first; ``prepare`` adopts such masks instead of stacking new ones, and ``restore_dense`` sets them back to
all ones instead of removing them.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.ao.pruning import BaseSparsifier
from torch.ao.pruning._experimental.pruner import FakeStructuredSparsity
from torch.nn.utils import parametrize

from gisp_plugin.anatomy.structures import HIDDEN_CHANNEL, MODEL_LEVEL, WHOLE_LAYER, KeepMask, ModelAnatomy


class BroadcastStructuredSparsity(FakeStructuredSparsity):
    """Like torch's ``FakeStructuredSparsity``, with a mask that broadcasts to the tensor.

    A mask shaped ``[out, 1]`` selects rows, ``[1, in]`` columns, ``[out]`` a bias; a fused tensor cut by
    several structures gets the conjunction of their masks.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.broadcast_shapes(self.mask.shape, x.shape) != x.shape:
            raise ValueError(f"mask of shape {tuple(self.mask.shape)} does not fit a tensor of shape {tuple(x.shape)}")
        return self.mask * x


def dense_tensor(module: nn.Module, name: str) -> torch.Tensor | None:
    """The unmasked tensor behind ``module.<name>``, whether or not a mask is attached."""
    if parametrize.is_parametrized(module, name):
        return getattr(module.parametrizations, name).original
    return getattr(module, name, None)


def resident_mask(module: nn.Module, name: str) -> BroadcastStructuredSparsity | None:
    """The mask already attached to ``module.<name>`` as its only parametrization (a sharded model's), if any."""
    if not parametrize.is_parametrized(module, name):
        return None
    chain = getattr(module.parametrizations, name)
    if len(chain) == 1 and isinstance(chain[0], BroadcastStructuredSparsity):
        return chain[0]
    return None


class StructureSparsifier(BaseSparsifier):
    """Masks every tensor slice of every structure kind according to a ``KeepMask``."""

    def __init__(self, anatomy: ModelAnatomy, hidden: bool = False):
        super().__init__(defaults={})
        self.anatomy = anatomy
        self.hidden = hidden
        self.keep = KeepMask.dense(anatomy, hidden=hidden)

    def sparsity_config(self, model: nn.Module) -> list[dict]:
        """One config entry per masked tensor, with every (layer, kind, slice) whose flags drive its mask."""
        drivers: dict[str, list[dict]] = {}
        for layer in self.anatomy.layers:
            kinds = {**layer.kinds, **({WHOLE_LAYER: layer.whole} if layer.whole is not None else {})}
            for kind_name, kind in kinds.items():
                slices = [(s, None) for s in kind.owned] + [(d.slice, d) for d in kind.dependents]
                for tensor_slice, dependent in slices:
                    driver = {"layer": layer.index, "kind": kind_name, "slice": tensor_slice, "dependent": dependent}
                    drivers.setdefault(f"{layer.prefix}.{tensor_slice.path}", []).append(driver)
        if self.hidden:
            for tensor_slice in self.anatomy.hidden_dimension().kind.owned:
                driver = {"layer": MODEL_LEVEL, "kind": HIDDEN_CHANNEL, "slice": tensor_slice, "dependent": None}
                drivers.setdefault(tensor_slice.path, []).append(driver)
        return [{"tensor_fqn": fqn, "drivers": entries} for fqn, entries in drivers.items()]

    def prepare(self, model: nn.Module, config: list[dict] | None = None) -> None:
        super().prepare(model, config if config is not None else self.sparsity_config(model))

    def _prepare(self, *args, **kwargs) -> None:
        for group in self.groups:
            module, name = group["module"], group["tensor_name"]
            tensor = dense_tensor(module, name)
            adopted = resident_mask(module, name)
            mask = self._mask(group["drivers"], tensor)
            group["adopted"] = adopted is not None
            if adopted is not None:
                adopted.mask.copy_(mask)
                mask = adopted.mask
            else:
                # a layer waiting on disk (gisp_plugin.calibration.onloading) has a meta weight: nothing to check it on
                unsafe = tensor.device.type == "meta"
                parametrize.register_parametrization(module, name, BroadcastStructuredSparsity(mask), unsafe=unsafe)
            self.state[group["tensor_fqn"]]["mask"] = mask

    def _mask(self, drivers: list[dict], tensor: torch.Tensor) -> torch.Tensor:
        """The conjunction of every driver's keep mask for ``tensor`` under the current ``KeepMask``."""
        mask = torch.ones((), dtype=torch.bool)
        for driver in drivers:
            flags = self.keep[driver["layer"], driver["kind"]]
            if driver["dependent"] is not None:
                flags = driver["dependent"].alive(flags)
            mask = mask & driver["slice"].keep_mask(flags, tensor.shape)
        return mask.to(tensor.device if tensor.device.type != "meta" else "cpu")  # masks stay real

    def update_mask(self, module: nn.Module, tensor_name: str, **group) -> None:
        parametrization = getattr(module.parametrizations, tensor_name)
        parametrization[0].mask.copy_(self._mask(group["drivers"], parametrization.original))

    def apply(self, keep: KeepMask) -> None:
        """Make the model compute exactly the subnetwork ``keep`` describes."""
        self.keep = keep.copy()
        if self.hidden and (MODEL_LEVEL, HIDDEN_CHANNEL) not in self.keep.flags:  # no hidden flags: all kept
            self.keep.flags[MODEL_LEVEL, HIDDEN_CHANNEL] = torch.ones(self.anatomy.hidden_dimension().width, dtype=torch.bool)
        self.step()

    def restore_dense(self) -> None:
        """Remove every mask and give the model back its dense, unmasked weights."""
        for group in self.groups:
            if group.get("adopted"):
                resident_mask(group["module"], group["tensor_name"]).mask.fill_(True)
            else:
                parametrize.remove_parametrizations(group["module"], group["tensor_name"], leave_parametrized=False)
        self.groups = []
