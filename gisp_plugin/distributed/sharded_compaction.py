"""Compacting a model sharded with FSDP2: gather one layer at a time onto rank 0, which builds the result.

Every rank takes part in each all-gather (``gathered``), one decoder layer after another; rank 0 cuts the
gathered layer with the same ``compact_layer`` as a one-process run and keeps only the cut tensors, so
no rank ever holds the whole dense model: rank 0's peak is the compacted model plus one dense layer.
The other ranks build nothing and get ``None``. The result equals the masked dense model in its outputs,
as ``compact_decoder`` does on one process; rank 0 saves it with ``save_pruned`` as usual.

Usage, in every rank after a sharded run::

    compact = compact_sharded(model, subnetwork.keep, subnetwork.extra_biases)
    if compact is not None:  # rank 0
        save_pruned(compact, tokenizer, out_dir, record)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from gisp_plugin.adapters.api import adapter_for
from gisp_plugin.anatomy.structures import KeepMask
from gisp_plugin.compaction.decoder import assemble_compacted, compact_layer, dense_state, kept_layers, layer_extras
from gisp_plugin.distributed.fsdp import gathered


def compact_sharded(
    model: PreTrainedModel,
    keep: KeepMask,
    extra_biases: dict[str, torch.Tensor] | None = None,
    pad_to: int = 1,
) -> PreTrainedModel | None:
    """The compacted model on rank 0 (``None`` on the other ranks); every rank must call it.

    ``extra_biases`` and ``pad_to`` mean what they mean for ``compact_decoder``.
    """
    adapter = adapter_for(model)
    declaration = adapter.declaration
    if declaration is None:
        raise ValueError(f"the {adapter.name!r} adapter declares no decoder layout; sharded compaction needs one")
    if keep.hidden_pruned():
        raise ValueError("hidden channels cannot be cut from a model sharded with FSDP yet; prune it unsharded")
    anatomy = adapter.anatomy(model)
    main = not dist.is_initialized() or dist.get_rank() == 0
    extra = extra_biases or {}
    specs, state = [], {}
    kept = kept_layers(anatomy, keep, extra)
    for new_index, layer in enumerate(tqdm(kept, desc="compacting", unit="layer", leave=False, disable=None if main else True)):
        module = model.get_submodule(layer.prefix)
        with gathered(module):
            if main:
                spec, tensors = compact_layer(module, layer, keep, declaration, layer_extras(extra, layer.prefix), pad_to)
                specs.append(spec)
                state.update({f"{declaration.layers}.{new_index}.{key}": value for key, value in tensors.items()})
    with gathered(model):  # the root's own group: embeddings, final norm, LM head
        if main:
            for key, value in dense_state(model).items():
                if not key.startswith(f"{declaration.layers}."):
                    state[key] = value.detach().clone()
    return assemble_compacted(model, specs, state, keep.removed_layers(), declaration) if main else None
