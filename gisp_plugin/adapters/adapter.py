"""What an architecture adapter provides, and the adapter of a Llama-like decoder made from its declaration."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers import PreTrainedModel

from gisp_plugin.anatomy.decoder import DecoderDeclaration, decoder_anatomy
from gisp_plugin.anatomy.structures import ModelAnatomy
from gisp_plugin.compaction.decoder import compact_decoder


class UnsupportedArchitectureError(ValueError):
    """The model's family has no adapter, and its anatomy cannot be read from its modules."""


def model_family(model: PreTrainedModel) -> str:
    """The ``model_type`` of the dense family (a compacted model names it as ``pruning_base_model_type``)."""
    config = model.config
    return getattr(config, "pruning_base_model_type", "") or getattr(config, "model_type", type(model).__name__)


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Maps one Hugging Face model family onto prunable structures and compacts it.

    ``model_types`` are the ``config.model_type`` values handled; ``anatomy`` reads the structures
    off a model; ``decoder_layers`` returns the layer list (sequential calibration walks it);
    ``compact(model, keep, extra_biases, pad_to)`` builds the physically smaller model for a ``KeepMask``
    and extra output biases, optionally padding widths to a multiple of ``pad_to`` with inert zeros.
    ``declaration`` is the family's ``DecoderDeclaration`` when the adapter is a Llama-like decoder (a
    model sharded with FSDP is compacted layer by layer from it, see ``distributed.sharded_compaction``;
    LoRA recovery adapts the projections it names). ``derived`` is True for an adapter whose declaration
    was read off the model's modules rather than written for the family (see ``adapters.derived``).
    """

    name: str
    description: str
    model_types: tuple[str, ...]
    anatomy: Callable[[PreTrainedModel], ModelAnatomy]
    decoder_layers: Callable[[PreTrainedModel], nn.ModuleList]
    compact: Callable[..., PreTrainedModel]
    declaration: Any = None
    derived: bool = False


def decoder_adapter(
    name: str, description: str, model_types: tuple[str, ...], declaration: DecoderDeclaration, derived: bool = False
) -> ArchitectureAdapter:
    """An adapter for a Llama-like family, from the names of its modules."""

    def anatomy(model):
        return decoder_anatomy(model, declaration, name)

    def compact(model, keep, extra_biases=None, pad_to: int = 1):
        return compact_decoder(model, keep, anatomy(model), declaration, extra_biases, pad_to)

    return ArchitectureAdapter(
        name=name,
        description=description,
        model_types=model_types,
        anatomy=anatomy,
        decoder_layers=lambda model: model.get_submodule(declaration.layers),
        compact=compact,
        declaration=declaration,
        derived=derived,
    )
