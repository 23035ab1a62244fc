"""Sharding a decoder with FSDP2 so that no rank holds the whole model or the whole gradient.

``shard_model`` follows torchtitan's ``parallelize_llama``: ``fully_shard`` each decoder layer, then the
root (embeddings, final norm, LM head). Every parameter becomes a ``DTensor`` whose dim-0 shard lives
on one rank; a layer's forward all-gathers that layer only, and its backward reduce-scatters the
gradients, so each rank receives the gradient of its own rows, summed over ranks.

The keep masks (``torch.ao.pruning`` parametrizations, see ``masking.sparsifier``) are attached before
sharding: FSDP then shards each masked tensor's ``original`` and the (small, replicated) mask multiplies
the all-gathered weight in the forward, exactly as on one process. ``MaskedModel`` adopts these masks.

Everything downstream stays unaware of FSDP: ``accumulate_gradients`` notices a sharded model and sums
each rank's gradient shard (``importance.sharded_gradients``), ``model_scores`` sums per-unit scores of
sharded tensors across ranks (``importance.structure_scores``), and compaction gathers one layer at a
time (``distributed.sharded_compaction``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from gisp_plugin.adapters.api import adapter_for
from gisp_plugin.masking.sparsifier import StructureSparsifier


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` (or any of its modules) was sharded with FSDP2 ``fully_shard``."""
    return any(isinstance(module, FSDPModule) for module in model.modules())


def attach_dense_masks(model: nn.Module) -> None:
    """Attach all-ones keep masks to every tensor a structure cuts (before ``fully_shard``; see module doc)."""
    StructureSparsifier(adapter_for(model).anatomy(model)).prepare(model)


def shard_model(model: nn.Module, cpu_offload: bool = False) -> nn.Module:
    """Attach dense masks, then ``fully_shard`` every decoder layer and the root, in place; returns ``model``.

    Gradients are summed over ranks, not averaged (divide factor 1, plain SUM reduce-scatter): each rank's loss
    already carries the full-set sample weights, so the sum is the full-set gradient. ``cpu_offload`` keeps
    the parameter shards (and their gradients) in CPU memory between uses (``CPUOffloadPolicy``): a model
    larger than one GPU's memory can then be scored on one GPU, one layer at a time.
    """
    if is_sharded(model):
        raise ValueError("the model is already sharded")
    attach_dense_masks(model)
    policy = {"offload_policy": CPUOffloadPolicy(pin_memory=torch.cuda.is_available())} if cpu_offload else {}
    layers = adapter_for(model).decoder_layers(model)
    for layer in layers:
        fully_shard(layer, **policy)
    fully_shard(model, **policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-multiplied sum)
    return model


@contextlib.contextmanager
def gathered(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` with its own FSDP parameter group all-gathered (every rank takes part), then resharded.

    Only the group of ``module`` itself is gathered: for a decoder layer that is one layer; for the root,
    the embeddings, final norm and LM head (never the layers, which are groups of their own).
    """
    if not isinstance(module, FSDPModule):
        yield module
        return
    module.unshard()
    try:
        yield module
    finally:
        module.reshard()


def local_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes this rank holds of ``tensors`` (a ``DTensor`` counts its local shard only)."""
    total = 0
    for tensor in tensors:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        total += local.numel() * local.element_size()
    return total
