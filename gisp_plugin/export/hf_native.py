"""``--format hf``: the family's own Hugging Face folder, padded to one shape per layer where needed.

Every engine loads a family's own config without custom code (transformers with
``trust_remote_code=False``, vLLM, SGLang, TensorRT-LLM, llama.cpp's ``convert_hf_to_gguf.py``), so this is the
format that runs anywhere: layers of different shapes are padded with inert zero heads and zero MLP
channels to one shape (``native.to_native(pad=True)``), which is exact and reported as executed parameters.
It is the way to serve families llama.cpp's per-layer ``deci`` graph cannot express (Gemma, Qwen3, Phi-4-mini).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from transformers import PreTrainedModel

from gisp_plugin.checkpoint.saving import count_params
from gisp_plugin.export.api import ExportError, ExportFormat, ExportOptions, ExportReport
from gisp_plugin.export.model_parts import model_parts
from gisp_plugin.export.native import NativeFormError, to_native

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "chat_template.jinja")


def check_hf(model: PreTrainedModel, options: ExportOptions) -> None:
    """Refuse what the family's own config cannot hold: routed experts of per-layer counts and widths."""
    parts = model_parts(model)
    experts = parts.declaration.experts
    if experts is not None and any(hasattr(layer.get_submodule(experts.module), experts.experts) for layer in parts.layers):
        raise ExportError(
            "a pruned mixture of experts keeps experts of their own widths, which the family's config cannot hold; "
            "serve the pruned folder itself (transformers with trust_remote_code=True)"
        )


def copy_tokenizer(source: Path, out: Path) -> None:
    """The tokenizer files of ``source`` that exist, copied into ``out``."""
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, out / name)


def write_hf(model: PreTrainedModel, tokenizer_folder: Path, out: Path, options: ExportOptions) -> ExportReport:
    """Write the family's own folder for ``model`` (padded to one shape per layer when its layers differ)."""
    try:
        native, notes = to_native(model, pad=True, grouping="pad" if options.grouping == "auto" else options.grouping)
    except NativeFormError as err:
        raise ExportError(f"the family's own config cannot express this model exactly: {err}") from None
    native.save_pretrained(out)
    copy_tokenizer(tokenizer_folder, out)
    return ExportReport(
        f"hf ({type(native).__name__})",
        out,
        "exact; loads with trust_remote_code=False",
        count_params(native)["decoder"],
        count_params(model)["decoder"],
        notes,
    )


HF = ExportFormat(
    name="hf",
    description="the family's own Hugging Face folder (no custom code), layers padded to one shape where they differ",
    single_file=False,
    check=check_hf,
    write=write_hf,
)
