"""The parts of a loaded (pruned or dense) causal LM an exporter needs, found through its family's adapter."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from gisp_plugin.adapters.api import ArchitectureAdapter, adapter_for
from gisp_plugin.anatomy.decoder import DecoderDeclaration
from gisp_plugin.export.api import ExportError


@dataclass(frozen=True)
class ModelParts:
    """A model's family declaration, its decoder layers and where they live (``model.layers``)."""

    family: str
    adapter: ArchitectureAdapter
    declaration: DecoderDeclaration
    layers: nn.ModuleList
    layers_path: str

    def outside_layers(self, model: PreTrainedModel) -> dict[str, torch.Tensor]:
        """Every parameter outside the decoder layers (embeddings, final norm, LM head), by its name; tied ones once."""
        seen: set[int] = set()
        params = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            if name.startswith(f"{self.layers_path}.") or id(param) in seen:
                continue
            seen.add(id(param))
            params[name] = param.detach()
        return params


def family_of(model: PreTrainedModel) -> str:
    """The dense family's ``model_type`` (a pruned model's config records it as ``pruning_base_model_type``)."""
    return getattr(model.config, "pruning_base_model_type", None) or model.config.model_type


def model_parts(model: PreTrainedModel) -> ModelParts:
    """The parts of ``model``; a family without a Llama-like declaration is refused in one line."""
    adapter = adapter_for(model)
    if adapter.declaration is None:
        raise ExportError(f"the {adapter.name} adapter declares no decoder layout, which exports read")
    layers = adapter.decoder_layers(model)
    path = next(name for name, module in model.named_modules() if module is layers)
    return ModelParts(family_of(model), adapter, adapter.declaration, layers, path)


def is_tied(model: PreTrainedModel) -> bool:
    """Whether the LM head shares the token embedding's weight."""
    output = model.get_output_embeddings()
    return output is not None and output.weight is model.get_input_embeddings().weight
