"""``accumulate_gradients`` on a model sharded with FSDP2: float32 sums sharded like the weights.

FSDP is data parallel as well: rank ``r`` runs its contiguous share ``shard_range`` of the calibration
set, with the sample weights computed on the whole set, and FSDP's reduce-scatter (a sum, see
``shard_model``) hands each rank the gradient of its own rows summed over every rank's samples. A
post-accumulate hook folds that shard into a float32 sum shaped like the shard and drops it, so no rank
ever holds a full gradient or a full float32 sum. The result is ``GradientSums`` whose ``grad`` values
are ``DTensor`` shards; ``model_scores`` reduces per-unit scores of such tensors across ranks.

The chain rule through a keep mask is autograd's (the masked weight is recomputed from the all-gathered
``original`` in every forward), so masked units get exactly zero, as on one process. A masked weight is a
new tensor that each linear layer would keep for its backward: a whole unsharded copy of the model by
the end of the forward. ``recomputed_masked_weights`` keeps a recipe instead (the mask and the owner of
the weight) and recomputes the masked weight in backward, when FSDP has gathered that layer again.
Every rank must run the same number of forward/backward passes (each is a collective): a rank with
fewer batches runs its first batch again with zero weight.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from gisp_plugin.data.api import CalibrationSet
from gisp_plugin.distributed.context import DistributedSetup, current_setup, shard_range
from gisp_plugin.distributed.data_parallel import rank_share
from gisp_plugin.finite import NonFiniteError
from gisp_plugin.importance.gradient_sums import (
    GradientSums,
    Objective,
    activation_checkpointing,
    only_these_require_grad,
    weight_tensor,
)
from gisp_plugin.inputs import InputError
from gisp_plugin.masking.sparsifier import BroadcastStructuredSparsity


@contextlib.contextmanager
def recomputed_masked_weights(model: nn.Module) -> Iterator[None]:
    """Let autograd save a recipe for each masked weight rather than the weight (see the module docstring).

    A forward hook on every mask notes the masked weights it produces; the saved-tensor hooks swap such a
    weight, or a view of it (a linear layer saves the transposed weight), for ``(mask, owner, view)`` when
    autograd saves it, and multiply again when backward needs it, from the parameter the owner holds at
    that moment (the all-gathered one, inside that layer's backward).
    """
    produced: dict[int, tuple[weakref.ref, BroadcastStructuredSparsity, nn.Module]] = {}

    def note(owner: nn.Module):
        def hook(mask: BroadcastStructuredSparsity, inputs: tuple, output: torch.Tensor) -> None:
            produced[id(output)] = (weakref.ref(output), mask, owner)

        return hook

    handles = []
    for module in model.modules():
        if parametrize.is_parametrized(module):
            for chain in module.parametrizations.values():
                for mask in chain:
                    if isinstance(mask, BroadcastStructuredSparsity):
                        handles.append(mask.register_forward_hook(note(chain)))

    def pack(tensor: torch.Tensor):
        base = tensor if tensor._base is None else tensor._base  # a linear layer saves the transposed weight
        entry = produced.get(id(base))
        if entry is not None and entry[0]() is base:
            return entry[1], entry[2], (tensor.size(), tensor.stride(), tensor.storage_offset())
        return tensor

    def unpack(saved):
        if isinstance(saved, tuple):
            mask, chain, view = saved
            with torch.no_grad():
                return mask(chain.original).as_strided(*view)
        return saved

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield
    finally:
        for handle in handles:
            handle.remove()
        produced.clear()


def accumulate_sharded_gradients(
    model: nn.Module,
    paths: list[str],
    calibration: CalibrationSet,
    objective: Objective,
    *,
    batch_size: int,
    per_sample_squares: bool,
    gradient_checkpointing: bool,
    sample_weights: torch.Tensor,
    pad_token_id: int,
    progress: str | None,
) -> GradientSums:
    """The FSDP path of ``accumulate_gradients`` (same arguments and result; see the module docstring);
    ``sample_weights`` are the whole set's, float64 ``[len(calibration)]``, already checked."""
    if per_sample_squares:
        raise InputError("per-sample squared gradients need one rank's own gradients; run without --fsdp")
    setup = current_setup(fsdp=True)
    weights = sample_weights
    local, local_weights = rank_share(calibration, weights, setup)
    rounds = max(
        math.ceil(len(shard_range(len(calibration), DistributedSetup(setup.world_size, r))) / batch_size)
        for r in range(setup.world_size)
    )
    params = {path: weight_tensor(model, path) for path in paths}
    device = next(iter(params.values())).device if params else next(model.parameters()).device
    sums = {path: torch.zeros_like(param, dtype=torch.float32) for path, param in params.items()}  # sharded like W

    def fold(path: str):
        def hook(param: torch.Tensor) -> None:
            sums[path].add_(param.grad.float())
            param.grad = None

        return hook

    batches = list(local.batches(batch_size, pad_token_id))
    loss_sum, n_tokens = 0.0, 0
    handles = [param.register_post_accumulate_grad_hook(fold(path)) for path, param in params.items()]
    try:
        with (
            only_these_require_grad(model, list(params.values())),
            activation_checkpointing(model, gradient_checkpointing),
            recomputed_masked_weights(model),
            torch.enable_grad(),
        ):
            for index in tqdm(range(rounds), desc=progress, leave=False, disable=True if progress is None else None):
                real = index < len(batches)
                batch = (batches[index] if real else batches[0]).to(device)
                start = index * batch_size
                w = local_weights[start : start + len(batch)] if real else torch.zeros(len(batch), dtype=torch.float64)
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
                losses = objective.per_sample(logits, batch)  # [batch]
                if not bool(torch.isfinite(losses.detach()).all()):
                    first = shard_range(len(calibration), setup).start + start
                    raise NonFiniteError(
                        f"calibration loss is not finite at samples {first}..{first + len(batch) - 1} of {calibration.name!r}; "
                        "check the model dtype (float16 overflows easily) and the data"
                    )
                (losses * w.to(device=losses.device, dtype=losses.dtype)).sum().backward()
                loss_sum += float((losses.detach().double().cpu() * w).sum())
                n_tokens += int(batch.attention_mask.sum()) if real else 0
    finally:
        for handle in handles:
            handle.remove()
        for param in params.values():
            param.grad = None

    totals = torch.tensor([loss_sum, n_tokens], dtype=torch.float64)
    dist.all_reduce(totals)
    for path, tensor in sums.items():
        local_sum = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        if not bool(torch.isfinite(local_sum).all()):
            raise NonFiniteError(f"gradient of {path} is not finite after calibration on {calibration.name!r}")
    return GradientSums(
        grad=sums,
        n_samples=int((weights != 0).sum()),
        loss=float(totals[0]),
        n_tokens=int(totals[1]),
        info={"objective": objective.name, "batch_size": batch_size, "fsdp_world_size": setup.world_size},
    )
