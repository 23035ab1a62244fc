"""What an architecture adapter provides, and how a model finds its adapter."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers import PreTrainedModel

from gisp_plugin.anatomy.structures import ModelAnatomy
from gisp_plugin.plugins.manager import registered


class UnsupportedArchitectureError(ValueError):
    """The model's family has no adapter."""


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Maps one Hugging Face model family onto prunable structures and compacts it.

    ``model_types`` are the ``config.model_type`` values handled; ``anatomy`` reads the structures
    off a model; ``decoder_layers`` returns the layer list (sequential calibration walks it);
    ``compact(model, keep, extra_biases, pad_to)`` builds the physically smaller model for a ``KeepMask``
    and extra output biases, optionally padding widths to a multiple of ``pad_to`` with inert zeros.
    ``declaration`` is the family's ``DecoderDeclaration`` when the adapter is a Llama-like decoder (a
    model sharded with FSDP is compacted layer by layer from it, see ``distributed.sharded_compaction``).
    """

    name: str
    description: str
    model_types: tuple[str, ...]
    anatomy: Callable[[PreTrainedModel], ModelAnatomy]
    decoder_layers: Callable[[PreTrainedModel], nn.ModuleList]
    compact: Callable[..., PreTrainedModel]
    declaration: Any = None


def adapter_for(model: PreTrainedModel) -> ArchitectureAdapter:
    """The registered adapter for this model's family, or an error naming the supported ones.

    A compacted model is found under its dense family (``config.pruning_base_model_type``).
    """
    config = model.config
    model_type = getattr(config, "pruning_base_model_type", None) or getattr(config, "model_type", type(model).__name__)
    adapters = [entry.item for entry in registered("adapter").values()]
    for adapter in adapters:
        if model_type in adapter.model_types:
            return adapter
    supported = ", ".join(sorted(t for a in adapters for t in a.model_types))
    raise UnsupportedArchitectureError(
        f"model type {model_type!r} is not supported; supported families: {supported}. "
        "To add one, write a plugin whose gisp_adapters() hook returns an ArchitectureAdapter "
        "(see docs/adding_a_method.md, 'Adding an architecture')."
    )
