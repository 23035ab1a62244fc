"""What loading and saving both need to know about weights: the dtypes by name, and a folder's safetensors
checked before transformers reads them (a module of its own, so ``models.loading``, which loads pruned
folders, and ``checkpoint.saving``, which reads them back, need not import each other)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

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


def _grouped(names: list[str], shown: int = 3) -> str:
    """Tensor names, the ones that differ only in numbers grouped (``model.layers.{3,4}.mlp.up_proj.weight``)."""
    groups: dict[str, list[list[str]]] = {}
    for name in sorted(names, key=lambda n: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", n)]):
        pattern = re.sub(r"\d+", "#", name)
        groups.setdefault(pattern, []).append(re.findall(r"\d+", name))
    parts = []
    for pattern, numbers in groups.items():
        columns = [sorted(set(col), key=int) for col in zip(*numbers, strict=True)]
        filled = ["{" + ",".join(col) + "}" if len(col) > 1 else col[0] for col in columns]
        pieces = pattern.split("#")
        parts.append("".join(piece + (filled[i] if i < len(filled) else "") for i, piece in enumerate(pieces)))
    more = f" and {len(parts) - shown} more" if len(parts) > shown else ""
    return ", ".join(parts[:shown]) + more


def check_loading_info(info: dict[str, Any], folder: str | Path, error: type[Exception] = ModelLoadError) -> None:
    """Refuse weights that do not match their ``config.json`` (transformers' ``output_loading_info``):
    a model with missing tensors would run with random ones, so every mismatch is named in one line.

    Tied weights (``lm_head`` tied to the embeddings) are not reported missing by transformers.
    """
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(info.get("unexpected_keys") or ())
    mismatched = sorted(info.get("mismatched_keys") or ())
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) the config needs are missing from the weights ({_grouped(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) in the weights have no place in the config ({_grouped(unexpected)})")
    if mismatched:
        name, stored, wanted = mismatched[0]
        problems.append(
            f"{len(mismatched)} tensor(s) have another shape than the config makes them "
            f"({_grouped([m[0] for m in mismatched])}; {name} is {tuple(stored)} in the weights, {tuple(wanted)} by the config)"
        )
    if problems:
        raise error(
            f"the weights in {str(folder)!r} do not match its config.json: {'; '.join(problems)}; "
            "restore the config.json that belongs to these weights (or the weights of this config)"
        )
