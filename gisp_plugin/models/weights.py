"""What loading and saving both need to know about weights: the dtypes by name, and a folder's safetensors
checked before transformers reads them (a module of its own, so ``models.loading``, which loads pruned
folders, and ``checkpoint.saving``, which reads them back, need not import each other)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from gisp_plugin.inputs import InputError

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


class ModelLoadError(OSError):
    """A model name or folder that cannot be loaded, with what to do about it."""


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise InputError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def check_weights(folder: str | Path) -> list[Path]:
    """The safetensors files of a local model folder, each with a readable, complete header.

    Weights are only ever read from safetensors (never pickle); a folder holding only
    ``pytorch_model.bin`` or a truncated file is refused with the file named, before transformers
    touches it.
    """
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        found = f" (found {', '.join(others)}: pickle files, which gisp never loads)" if others else ""
        raise ModelLoadError(
            f"model folder {str(folder)!r} has no .safetensors weights{found}; "
            "re-save it with model.save_pretrained(folder) (safetensors is the default)"
        )
    for file in files:
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise ModelLoadError(
                f"weights file {str(file)!r} is damaged or truncated ({err}); re-download or re-save it"
            ) from None
    return files
