"""How a model finds its adapter: a declared one if a plugin has it, otherwise one read off its modules."""

from __future__ import annotations

from transformers import PreTrainedModel

from gisp_plugin.adapters.adapter import ArchitectureAdapter, UnsupportedArchitectureError, model_family
from gisp_plugin.adapters.derived import derived_adapter
from gisp_plugin.plugins.manager import registered

__all__ = ["ArchitectureAdapter", "UnsupportedArchitectureError", "adapter_for", "model_family"]


def adapter_for(model: PreTrainedModel) -> ArchitectureAdapter:
    """The adapter of this model's family.

    A registered adapter (built in, or from an installed plugin) that lists the family wins; otherwise
    the declaration is read off the model's decoder layers (``adapters.derived``), and a family that does
    not follow the attention + MLP pattern is refused in one line naming what is missing.
    """
    model_type = model_family(model)
    for entry in registered("adapter").values():
        if model_type in entry.item.model_types:
            return entry.item
    return derived_adapter(model)
