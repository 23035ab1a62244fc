"""Kept weights a method changed: written into the dense tensors for a while, then given back.

Most methods only choose what to remove. A few also change what they keep (SlimGPT's Optimal-Brain-Surgeon
compensation rewrites the remaining columns of ``o_proj`` / ``down_proj``). Such a method states the new
values as ``{tensor path: dense-shaped tensor}`` (``Subnetwork.updated_weights``, e.g.
``model.layers.3.mlp.down_proj.weight``). ``WeightSwap`` writes them into the model's dense (unmasked)
tensors in place and remembers the values they replaced, so the masked model computes the pruned and
compensated network and ``restore`` gives the dense model back bit for bit; compaction runs inside one and
cuts the updated tensors like any other. The replaced values wait in CPU memory, not on the accelerator.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from gisp_plugin.masking.sparsifier import dense_tensor


def _target(model: nn.Module, path: str) -> torch.Tensor:
    module_path, _, name = path.rpartition(".")
    try:
        tensor = dense_tensor(model.get_submodule(module_path), name)
    except AttributeError:
        tensor = None
    if tensor is None:
        raise ValueError(f"an updated weight names {path}, which is not a tensor of the model")
    return tensor


class WeightSwap:
    """Updated weights written into a model's dense tensors, removable without a trace."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.saved: dict[str, torch.Tensor] = {}  # path -> the value it had before the first update (on the CPU)
        self._written: dict[str, torch.Tensor] = {}  # path -> the update it holds now

    @property
    def paths(self) -> list[str]:
        return sorted(self.saved)

    @torch.no_grad()
    def write(self, updates: Mapping[str, torch.Tensor]) -> None:
        """Make the model hold exactly ``updates`` over its own values: earlier updates not named again are
        undone first."""
        for path, value in updates.items():
            tensor = _target(self.model, path)
            if tuple(value.shape) != tuple(tensor.shape):
                raise ValueError(f"updated weight {path} has shape {tuple(value.shape)}, the model's is {tuple(tensor.shape)}")
        for path in [p for p in self.saved if p not in updates]:
            _target(self.model, path).copy_(self.saved.pop(path))
            del self._written[path]
        for path, value in updates.items():
            if self._written.get(path) is value:  # a sequential method names every earlier layer's update again
                continue
            tensor = _target(self.model, path)
            if path not in self.saved:
                self.saved[path] = tensor.detach().to("cpu", copy=True)
            tensor.copy_(value.to(device=tensor.device, dtype=tensor.dtype))
            self._written[path] = value

    def restore(self) -> None:
        """Give every updated tensor back its value from before."""
        self.write({})


@contextmanager
def updated_weights(model: nn.Module, updates: Mapping[str, torch.Tensor]) -> Iterator[nn.Module]:
    """``model`` holding ``updates`` inside the block (compaction of a subnetwork that changed kept weights)."""
    swap = WeightSwap(model)
    swap.write(updates)
    try:
        yield model
    finally:
        swap.restore()
