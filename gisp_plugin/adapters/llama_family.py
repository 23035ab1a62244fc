"""Built-in adapter plugin for Llama 2/3, Mistral and Qwen2."""

from __future__ import annotations

from gisp_plugin.adapters.api import ArchitectureAdapter
from gisp_plugin.anatomy.llama import llama_family_anatomy
from gisp_plugin.compaction.llama import compact_llama_family
from gisp_plugin.plugins import hookimpl

LLAMA_FAMILY = ArchitectureAdapter(
    name="llama-family",
    description="Llama 2/3, Mistral (GQA, sliding window) and Qwen2 (q/k/v biases): query heads and MLP channels",
    model_types=("llama", "mistral", "qwen2"),
    anatomy=lambda model: llama_family_anatomy(model, "llama-family"),
    decoder_layers=lambda model: model.model.layers,
    compact=compact_llama_family,
)


@hookimpl
def gisp_adapters() -> list[ArchitectureAdapter]:
    return [LLAMA_FAMILY]
